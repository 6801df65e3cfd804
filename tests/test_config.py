import dataclasses

import pytest

from hcd_fast import HCDConfig


def test_defaults_match_spec():
    c = HCDConfig()
    assert (c.num_sub_logits, c.temperature, c.label_smoothing, c.ortho_threshold) == (4, 1.0, 0.1, 0.5)
    assert (c.lambda_student, c.lambda_teacher, c.gt_mask, c.detach_sub_targets) == (1.0, 1.0, "zero", False)
    assert (c.cfm_hidden, c.embed_dim, c.ortho_on) == ("teacher", None, "fused")
    assert (c.w_gt, c.w_kd, c.w_kl, c.w_ol) == (1.0, 1.0, 6.0, 1.0)


def test_frozen_and_replace():
    c = HCDConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.temperature = 2.0
    assert c.replace(temperature=4.0).temperature == 4.0
    with pytest.raises(ValueError, match="temperature"):
        c.replace(temperature=0.0)


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_sub_logits=0), "num_sub_logits"),
    (dict(num_sub_logits=2.0), "num_sub_logits"),
    (dict(num_sub_logits=True), "num_sub_logits"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(gt_mask="ones"), "gt_mask"),
    (dict(detach_sub_targets=1), "detach_sub_targets"),
    (dict(cfm_hidden=0), "cfm_hidden"),
    (dict(cfm_hidden="student"), "cfm_hidden"),
    (dict(embed_dim=-3), "embed_dim"),
    (dict(w_kl=-1.0), "w_kl"),
    (dict(ortho_eps=0.0), "ortho_eps"),
    (dict(lambda_teacher="1"), "lambda_teacher"),
    (dict(ortho_threshold=1.0), "ortho_threshold"),
    (dict(ortho_threshold=-1.5), "ortho_threshold"),
    (dict(ortho_on="pre"), "ortho_on"),
])
def test_invalid_options_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HCDConfig(**kwargs)


def test_valid_variants_accepted():
    HCDConfig(cfm_hidden=None, embed_dim=256, gt_mask="large_negative", num_sub_logits=1, w_ol=0.0,
              ortho_threshold=-0.5, label_smoothing=0.0)
    HCDConfig(ortho_threshold=-1.0, ortho_on="raw", lambda_student=-2.0, lambda_teacher=0.0)


def test_every_field_has_help_text():
    for f in dataclasses.fields(HCDConfig):
        assert len(f.metadata.get("help", "")) > 10, f.name


def test_hcd_distill_flags_are_generated_from_the_config():
    """Every field is a flag with the field's default and help; --ortho-on reaches HCDConfig."""
    from hcd_fast.distill.cli import build_parser
    from hcd_fast.distill.cli import parse_args

    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(HCDConfig):
        assert actions[f.name].default == f.default, f.name
        assert f.metadata["help"] in actions[f.name].help, f.name
    assert actions["ortho_on"].choices == ("fused", "raw")
    cfg = parse_args(["--student", "s", "--ortho-on", "raw", "--ortho-threshold", "-0.25"]).loss
    assert (cfg.ortho_on, cfg.ortho_threshold) == ("raw", -0.25)
