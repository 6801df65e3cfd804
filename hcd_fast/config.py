"""HCDConfig: every option of the HCD loss, explicit, with the default of SPEC section 2.

Each field carries its help text (``dataclasses.fields(HCDConfig)[i].metadata["help"]``): the hcd-distill
flags are generated from it, so the documentation of an option exists once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

GT_MASK_MODES = ("zero", "none", "large_negative")
ORTHO_ON_MODES = ("fused", "raw")

# Value written at the target class by gt_mask="large_negative" (SPEC section 2, item 6).
LARGE_NEGATIVE = -1e6


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class HCDConfig:
    """Options of the HCD loss (SPEC section 2). Frozen; validated on construction.

    Sign rules: the ``w_*`` weights are >= 0. ``lambda_student`` and ``lambda_teacher`` may be any finite
    number: zf = lambda_student * z + lambda_teacher * z_t is linear in both, a negative weight flips that
    term's sign, ``lambda_teacher = 0`` removes the teacher from the fusion, and ``lambda_student = 0`` makes
    the sub-logits constant (the CFM then receives no gradient; with ``ortho_on="raw"`` the orthogonality
    term is then 0). ``ortho_threshold`` is a cosine, in [-1, 1).
    """

    num_sub_logits: int = _opt(4, "n, the number of sub-logits the shared CFM logits are split into (>= 1)")
    temperature: float = _opt(1.0, "T of every KL term (> 0); KL terms are scaled by T^2")
    label_smoothing: float = _opt(0.1, "label smoothing of every cross-entropy term, in [0, 1)")
    ortho_threshold: float = _opt(0.5, "theta of the orthogonality hinge relu(cos - theta)^2, a cosine in [-1, 1)")
    ortho_eps: float = _opt(1e-12, "eps of the sub-logit normalisation v / max(||v||, eps) (> 0)")
    ortho_on: str = _opt("fused", "which sub-logits the orthogonality loss sees: 'fused' (zf, after the "
                         "teacher fusion) or 'raw' (the CFM's own sub-logits, before it)", choices=ORTHO_ON_MODES)
    lambda_student: float = _opt(1.0, "weight of the CFM sub-logits in the fusion zf = ls*z + lt*z_t (any "
                                 "finite number)")
    lambda_teacher: float = _opt(1.0, "weight of the teacher logits in the fusion (any finite number; 0: no "
                                 "teacher fusion)")
    gt_mask: str = _opt("zero", "target-class entry of each sub-logit in the orthogonality loss: 'zero' (set "
                        "to 0), 'none' (kept) or 'large_negative' (set to -1e6)", choices=GT_MASK_MODES)
    detach_sub_targets: bool = _opt(False, "detach the fused sub-logits where they are the sub-logit KL's "
                                    "target, so that KL trains only the student logits")
    cfm_hidden: Optional[object] = _opt("teacher", "CFM hidden width: 'teacher' (D_t), an int, or None (a single "
                                        "linear D + D_t -> n*K)")
    embed_dim: Optional[int] = _opt(None, "D, the projector output width; None: max(C_last, D_t)")
    w_gt: float = _opt(1.0, "weight of CE(z_s) + sum_s subCE_s (>= 0)")
    w_kd: float = _opt(1.0, "weight of the Hinton KD term T^2 KL(p_t || p_s) (>= 0)")
    w_kl: float = _opt(6.0, "weight of sum_s subKL_s (>= 0)")
    w_ol: float = _opt(1.0, "weight of sum_s OL_s, the orthogonality loss (>= 0)")

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"HCDConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        n = self.num_sub_logits
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad("num_sub_logits", "an int >= 1")
        for name in ("temperature", "label_smoothing", "ortho_threshold", "ortho_eps",
                     "lambda_student", "lambda_teacher", "w_gt", "w_kd", "w_kl", "w_ol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                raise bad(name, "a finite number")
        if not self.temperature > 0:
            raise bad("temperature", "a number > 0")
        if not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "a number in [0, 1)")
        if not -1 <= self.ortho_threshold < 1:
            raise bad("ortho_threshold", "a cosine in [-1, 1)")
        if not self.ortho_eps > 0:
            raise bad("ortho_eps", "a number > 0")
        for name in ("w_gt", "w_kd", "w_kl", "w_ol"):
            if getattr(self, name) < 0:
                raise bad(name, "a number >= 0")
        if self.gt_mask not in GT_MASK_MODES:
            raise bad("gt_mask", f"one of {GT_MASK_MODES}")
        if self.ortho_on not in ORTHO_ON_MODES:
            raise bad("ortho_on", f"one of {ORTHO_ON_MODES}")
        if not isinstance(self.detach_sub_targets, bool):
            raise bad("detach_sub_targets", "a bool")
        h = self.cfm_hidden
        if not (h is None or h == "teacher" or (isinstance(h, int) and not isinstance(h, bool) and h >= 1)):
            raise bad("cfm_hidden", "None, 'teacher' or an int >= 1")
        e = self.embed_dim
        if not (e is None or (isinstance(e, int) and not isinstance(e, bool) and e >= 1)):
            raise bad("embed_dim", "None or an int >= 1")

    def replace(self, **changes) -> "HCDConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
