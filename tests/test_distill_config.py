"""hcd-distill's declared options: every numeric flag's range is declared once (config.py / the methods'
option dataclasses) and a value outside it exits with code 2 naming the flag, before anything is built."""
import dataclasses

import pytest

from hcd_fast.distill.cli import build_cache_parser, build_parser, main, parse_args
from hcd_fast.distill.config import CacheConfig, TrainConfig
from hcd_fast.distill.data.loaders import LOADERS
from hcd_fast.distill.methods import METHODS, REGISTRY
from hcd_fast.distill.options import flag_name

OPTION_TYPES = [TrainConfig, CacheConfig] + [m.options for m in REGISTRY.values() if m.options is not None]
STUDENT = ["--student", "resnet10t", "--method", "ce"]


def numeric_fields(cls):
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested") or f.metadata.get("kind") or "choices" in f.metadata:
            continue
        if any(t in str(f.type) for t in ("int", "float")):
            yield f


def outside(bounds: dict):
    """A value just outside ``bounds`` (of the field's own type)."""
    key, b = next(iter(bounds.items()))
    step = 1 if isinstance(b, int) else 0.5
    return {"ge": b - step, "gt": b, "le": b + step, "lt": b}[key]


def test_every_numeric_flag_declares_its_range():
    for cls in OPTION_TYPES:
        for f in numeric_fields(cls):
            assert f.metadata.get("bounds"), f"{cls.__name__}.{f.name}"


CASES = [(cls, f) for cls in (TrainConfig, *OPTION_TYPES[2:]) for f in numeric_fields(cls)]


@pytest.mark.parametrize("cls, f", CASES, ids=[f"{c.__name__}.{f.name}" for c, f in CASES])
def test_out_of_range_flag_exits_2_naming_it(tmp_path, capsys, cls, f):
    flag = flag_name(f.name)
    assert main(STUDENT + ["--output", str(tmp_path / "o"), flag, str(outside(f.metadata["bounds"]))]) == 2
    err = capsys.readouterr().err
    assert flag in err and "expected a value" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("f", list(numeric_fields(CacheConfig)), ids=lambda f: f.name)
def test_out_of_range_cache_flag_exits_2_naming_it(tmp_path, capsys, f):
    flag = flag_name(f.name)
    argv = ["cache-teacher", "--teacher", "resnet10t", "--allow-random-teacher", "--output", str(tmp_path / "c"),
            flag, str(outside(f.metadata["bounds"]))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()


def test_non_finite_float_exits_2(capsys):
    assert main(STUDENT + ["--lr", "nan"]) == 2
    assert "--lr nan: expected a finite number" in capsys.readouterr().err


def test_hcd_config_errors_name_the_flag(capsys):
    assert main(STUDENT + ["--temperature", "0"]) == 2
    assert "--temperature" in capsys.readouterr().err


def test_help_states_defaults_and_ranges():
    text = " ".join(build_parser().format_help().split())
    assert "--val-fraction VAL_FRACTION digits: held-out fraction (0: no validation) (default 0.2; >= 0.0 and < 1.0)" \
        in text
    assert "(default 16; >= 1 and <= 1024)" in " ".join(build_cache_parser().format_help().split())


def test_methods_and_loaders_come_from_their_registries():
    """--method and --loader list the registries; each method's own options are flags that reach its config."""
    actions = {a.dest: a for a in build_parser()._actions}
    assert tuple(actions["method"].choices) == METHODS and tuple(actions["loader"].choices) == tuple(LOADERS)
    cfg = parse_args(["--student", "s", "--method", "dkd", "--dkd-beta", "8", "--w-ofa", "2"])
    assert cfg.method_config().dkd_beta == 8.0 and cfg.method_options["ofa"].w_ofa == 2.0
    assert cfg.flat()["dkd_beta"] == 8.0 and cfg.flat()["temperature"] == cfg.loss.temperature
