"""The frozen teacher tap: penultimate feature f_t (B, D_t) and logits z_t (B, K) of any timm model through
``forward_features`` -> ``forward_head(pre_logits=True)`` -> the classifier, in eval mode under
``torch.inference_mode``. A teacher trained with other input statistics than the student's gets the
student's normalised input converted on the device: x_t = (x_s * std_s + mean_s - mean_t) / std_t."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hcd_fast.distill.taps import device_of, require_methods


Stats = Tuple[Sequence[float], Sequence[float]]  # (mean (3,), std (3,))


class TeacherTap(nn.Module):
    """Frozen teacher: ``forward(x (B, 3, H, W)) -> (feat (B, D_t), logits (B, K))``, no gradient ever.

    The module stays in eval mode whatever ``.train()`` is called with, its parameters have
    ``requires_grad=False``, and the forward runs under ``torch.inference_mode``.

    Args:
        model: a timm model with ``forward_features`` and ``forward_head``.
        input_stats: (mean, std) the input ``x`` is normalised with (the student's data config).
        teacher_stats: (mean, std) the teacher expects. When both are given and differ, ``x`` is converted
            (x * std_in / std_t + (mean_in - mean_t) / std_t per channel) before the teacher sees it.
    """

    def __init__(self, model: nn.Module, input_stats: Optional[Stats] = None, teacher_stats: Optional[Stats] = None):
        super().__init__()
        require_methods(model, ("forward_features", "forward_head"), "teacher")
        self.model = model
        model.requires_grad_(False)
        # The statistics the teacher's input is normalised with, as it sees it (the teacher cache records
        # them: cached f_t must come from the same teacher input as the online forward).
        stats = teacher_stats if teacher_stats is not None else input_stats
        self.teacher_input_stats = (None if stats is None else
                                    (tuple(float(v) for v in stats[0]), tuple(float(v) for v in stats[1])))
        self.renormalize = (input_stats is not None and teacher_stats is not None
                            and any(tuple(map(float, a)) != tuple(map(float, b))
                                    for a, b in zip(input_stats, teacher_stats)))
        if self.renormalize:
            (m_in, s_in), (m_t, s_t) = [(torch.tensor(m, dtype=torch.float32).view(1, -1, 1, 1),
                                         torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1))
                                        for m, s in (input_stats, teacher_stats)]
            self.register_buffer("in_scale", s_in / s_t, persistent=False)
            self.register_buffer("in_shift", (m_in - m_t) / s_t, persistent=False)
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        # logits = classifier(pre_logits); models whose head is not one module fall back to forward_head.
        # probe_teacher turns it off when classifier(pre_logits) differs from forward_head; only a teacher
        # with it on can be replaced by its cached features (logits_from_feat).
        self.uses_classifier = isinstance(classifier, nn.Module)
        # Speed settings (hcd_fast.distill.teacher.speed): weights' dtype the input is cast to (None: as
        # given), channels_last input, and the (possibly compiled) forward.
        self.input_dtype: Optional[torch.dtype] = None
        self.channels_last = False
        self._fwd = self._forward
        self.compiled = False  # compile_forward was called
        super().train(False)

    def train(self, mode: bool = True) -> "TeacherTap":
        return super().train(False)

    def _forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.renormalize:
            x = x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)
        t = self.model.forward_features(x)
        feat = self.model.forward_head(t, pre_logits=True)
        logits = self.model.get_classifier()(feat) if self.uses_classifier else self.model.forward_head(t)
        return feat, logits

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            if self.input_dtype is not None:
                x = x.to(self.input_dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feat, logits = self._fwd(x)
        # Inference tensors cannot enter autograd; a clone outside inference mode is an ordinary tensor.
        # Low-precision weights give fp32 outputs (the same dtype whatever the weights are stored in).
        if self.input_dtype is not None:
            return feat.float(), logits.float()
        return feat.clone(), logits.clone()

    def logits_from_feat(self, feat: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, K) from a stored pre-logit feature f_t (B, D_t): the classifier alone (what
        the teacher cache replays). Only for teachers whose logits are ``classifier(pre_logits)``, which
        ``probe_teacher`` checks against ``forward_head``."""
        if not self.uses_classifier:
            raise ValueError("this teacher's logits are not classifier(pre_logits); its features cannot "
                             "stand in for its forward")
        with torch.inference_mode():
            w = self.model.get_classifier().weight
            logits = self.model.get_classifier()(feat.to(w.dtype))
        return logits.float() if self.input_dtype is not None else logits.clone()

    def compile_forward(self, mode: Optional[str] = None, **kwargs) -> None:
        """torch.compile the teacher forward on its own (features, pre-logits and classifier in one
        graph, static shapes); ``mode="reduce-overhead"`` adds CUDA graphs on CUDA."""
        self._fwd = torch.compile(self._forward, mode=mode, dynamic=False, **kwargs)
        self.compiled = True


@torch.no_grad()
def probe_teacher(tap: TeacherTap, input_size: Tuple[int, int, int]) -> Tuple[int, int]:
    """(D_t, K) of the teacher from one dry run; checks the classifier path against forward_head."""
    # A private generator: probing must not move the global RNG (runs stay reproducible).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_size, generator=g).to(device_of(tap.model))
    feat, logits = tap(x)
    if tap.uses_classifier:
        with torch.inference_mode():
            xt = x * tap.in_scale + tap.in_shift if tap.renormalize else x
            direct = tap.model.forward_head(tap.model.forward_features(xt))
        if direct.shape != logits.shape or not torch.allclose(direct, logits, rtol=1e-4, atol=1e-4):
            tap.uses_classifier = False
            feat, logits = tap(x)
    if feat.dim() != 2:
        raise ValueError(f"teacher pre-logits feature: expected (B, D_t), got shape {tuple(feat.shape)}")
    return int(feat.shape[1]), int(logits.shape[-1])


