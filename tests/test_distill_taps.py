"""Feature taps, Distiller and DistillTask on tiny timm models, against direct timm calls and HCDLoss."""
import pytest
import timm
import torch

from hcd_fast import HCDConfig, HCDLoss
from hcd_fast.distill import (HAS_TIMM_TASK, Distiller, DistillTask, StudentTap, TeacherTap,
                              build_criterion, probe_student, probe_teacher)

STUDENT = dict(model_name="resnet10t", channels=(8, 16, 32, 64), stem_width=8)
TEACHER = dict(model_name="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=16, num_heads=2)
K = 7


def make(spec, **kw):
    return timm.create_model(pretrained=False, num_classes=K, **spec, **kw)


def test_student_tap_matches_model_and_probe():
    torch.manual_seed(0)
    model = make(STUDENT).eval()
    x = torch.randn(3, 3, 16, 16)
    for indices, n in ((4, 4), ([2, 4], 2), (1, 1)):
        logits, feats = StudentTap(model, indices)(x)
        torch.testing.assert_close(logits, model(x))
        want = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        assert len(feats) == n
        for f, w in zip(feats, want):
            torch.testing.assert_close(f, w)
        channels, k = probe_student(model, indices, (3, 16, 16))
        assert channels == tuple(f.shape[1] for f in feats) and k == K
    assert probe_student(model, 4, (3, 16, 16))[0] == (8, 16, 32, 64)
    model.train()
    probe_student(model, 4, (3, 16, 16))
    assert model.training  # the probe restores the mode


def test_teacher_tap_frozen_and_exact():
    torch.manual_seed(1)
    model = make(TEACHER)
    tap = TeacherTap(model)
    tap.train()
    assert not tap.training and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.randn(5, 3, 16, 16)
    feat, logits = tap(x)
    with torch.no_grad():
        torch.testing.assert_close(feat, model.forward_head(model.forward_features(x), pre_logits=True))
        torch.testing.assert_close(logits, model(x))
    assert not feat.is_inference() and not logits.is_inference()
    assert probe_teacher(tap, (3, 16, 16)) == (16, K)
    # Usable as a constant in an autograd graph.
    w = torch.randn(K, requires_grad=True)
    (logits * w).sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("method", ["hcd", "ofa", "kd", "dkd", "ce"])
def test_distiller_wiring(method):
    torch.manual_seed(2)
    student, teacher = make(STUDENT), TeacherTap(make(TEACHER))
    channels, _ = probe_student(student, 3, (3, 16, 16))
    crit = build_criterion(method, channels, 16, K, HCDConfig(num_sub_logits=3), backend="reference")
    distiller = Distiller(student, crit, indices=3)
    task = DistillTask(distiller, teacher if method != "ce" else None)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 6, 2, 2])
    out = task(x, y)
    assert {"loss", "output"} <= set(out) and set(crit.part_names if method != "hcd" else
                                                  ("ce", "sub_ce", "kd", "sub_kl", "ortho")) <= set(out)
    assert out["output"].shape == (4, K) and out["loss"].dim() == 0
    out["loss"].backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())
    if method in ("hcd", "ofa"):
        assert all(p.grad is not None for p in crit.parameters())
    assert task.get_eval_model() is student
    if HAS_TIMM_TASK:
        from timm.task import TrainingTask
        assert isinstance(task, TrainingTask)


def test_distiller_hcd_equals_hcdloss_on_direct_timm_outputs():
    """Distiller(x) == HCDLoss(forward_intermediates, model(x), teacher pre-logits, teacher logits)."""
    torch.manual_seed(3)
    student, tmodel = make(STUDENT), make(TEACHER)
    crit = HCDLoss((8, 16, 32, 64), 16, K, HCDConfig(num_sub_logits=2, temperature=2.0), backend="reference")
    distiller = Distiller(student, crit).eval()  # eval: BN statistics are not updated twice
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 5, 0])
    tf, tl = TeacherTap(tmodel)(x)
    logits, loss, parts = distiller(x, y, tf, tl)
    with torch.no_grad():
        feats = student.forward_intermediates(x, indices=4, intermediates_only=True)
        t_pre = tmodel.forward_head(tmodel.forward_features(x), pre_logits=True)
        want, want_parts = crit(feats, student(x), t_pre, tmodel(x), y, return_parts=True)
    torch.testing.assert_close(loss.detach(), want)
    for k, v in want_parts.items():
        torch.testing.assert_close(parts[k], v)


def test_distill_task_without_timm_task():
    """Older timm (no timm.task, e.g. on another machine): DistillTask falls back to an nn.Module base."""
    import subprocess
    import sys
    code = (
        "import importlib.util, torch, timm\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'timm.task' else real(name, *a)\n"
        "from hcd_fast.distill import HAS_TIMM_TASK, Distiller, DistillTask, CELoss\n"
        "assert not HAS_TIMM_TASK\n"
        "m = timm.create_model('resnet10t', num_classes=3, channels=(8, 16, 32, 64), stem_width=8)\n"
        "task = DistillTask(Distiller(m, CELoss()), None).train()\n"
        "out = task(torch.randn(2, 3, 16, 16), torch.tensor([0, 2]))\n"
        "out['loss'].backward()\n"
        "assert task.get_eval_model() is m and out['output'].shape == (2, 3)\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_teacher_tap_converts_the_students_normalisation():
    """x normalised with the student's statistics reaches the teacher normalised with its own."""
    torch.manual_seed(3)
    model = make(TEACHER).eval()
    raw = torch.rand(2, 3, 16, 16)
    s_mean, s_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t_mean, t_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    x_student = (raw - view(s_mean)) / view(s_std)
    x_teacher = (raw - view(t_mean)) / view(t_std)
    tap = TeacherTap(model, (s_mean, s_std), (t_mean, t_std))
    feat, logits = tap(x_student)
    torch.testing.assert_close(logits, model(x_teacher), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feat, model.forward_head(model.forward_features(x_teacher), pre_logits=True),
                               rtol=1e-5, atol=1e-5)
    same = TeacherTap(model, (s_mean, s_std), (s_mean, s_std))
    assert not same.renormalize
    torch.testing.assert_close(same(x_student)[1], model(x_student))
