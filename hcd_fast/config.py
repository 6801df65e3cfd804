"""HCDConfig: every option of the HCD loss, explicit, with the default of SPEC section 2."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

GT_MASK_MODES = ("zero", "none", "large_negative")

# Value written at the target class by gt_mask="large_negative" (SPEC section 2, item 6).
LARGE_NEGATIVE = -1e6


@dataclass(frozen=True)
class HCDConfig:
    """Options of the HCD loss (SPEC section 2). Frozen; validated on construction.

    Attributes:
        num_sub_logits: n, the number of sub-logits the shared logits are split into (>= 1).
        temperature: T of every KL term (> 0). KL terms are scaled by T^2.
        label_smoothing: ls of every cross-entropy term, in [0, 1).
        ortho_threshold: theta of the orthogonality hinge relu(G_ij - theta)^2.
        ortho_eps: eps of the sub-logit normalisation v / max(||v||, eps).
        lambda_student: weight of the CFM sub-logits in the fusion zf = ls*z + lt*z_t.
        lambda_teacher: weight of the teacher logits in that fusion.
        gt_mask: what the orthogonality loss does with the target class entry of each
            sub-logit: "zero" (set to 0), "none" (keep), "large_negative" (set to -1e6).
        detach_sub_targets: detach the fused sub-logits where they are the KL target, so the
            sub-logit KL trains only the student logits.
        cfm_hidden: hidden width of the CFM MLP; "teacher" means D_t (the default), an int gives
            that width, None gives a single linear D + D_t -> n*K.
        embed_dim: D, the projector output width; None means max(C_last, D_t).
        w_gt: weight of CE(z_s) + sum_s subCE_s.
        w_kd: weight of the Hinton KD term T^2 KL(p_t || p_s).
        w_kl: weight of sum_s subKL_s.
        w_ol: weight of sum_s OL_s.
    """

    num_sub_logits: int = 4
    temperature: float = 1.0
    label_smoothing: float = 0.1
    ortho_threshold: float = 0.5
    ortho_eps: float = 1e-12
    lambda_student: float = 1.0
    lambda_teacher: float = 1.0
    gt_mask: str = "zero"
    detach_sub_targets: bool = False
    cfm_hidden: Optional[object] = "teacher"
    embed_dim: Optional[int] = None
    w_gt: float = 1.0
    w_kd: float = 1.0
    w_kl: float = 6.0
    w_ol: float = 1.0

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
        if not self.ortho_eps > 0:
            raise bad("ortho_eps", "a number > 0")
        for name in ("w_gt", "w_kd", "w_kl", "w_ol"):
            if getattr(self, name) < 0:
                raise bad(name, "a number >= 0")
        if self.gt_mask not in GT_MASK_MODES:
            raise bad("gt_mask", f"one of {GT_MASK_MODES}")
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
