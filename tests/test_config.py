import pytest

from sid_fast.config import SiDConfig, dump_yaml, load_config


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr_generator=-1e-4", "optim.lr_generator"),
        ("optim.lr_fake=0", "optim.lr_fake"),
        ("method.num_steps=0", "method.num_steps"),
        ("method.weighting=edm", "method.weighting"),
        ("method.noise=pink", "method.noise"),
        ("train.batch_size=0", "train.batch_size"),
        ("teacher.path=/nonexistent/teacher", "teacher.path"),
        ("method.time.scheme=cosine", "method.time.scheme"),
        ("train.ema_decay=1.5", "train.ema_decay"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(overrides=[override])


def test_unknown_field_and_type_errors():
    with pytest.raises(ValueError, match="method.alpah"):
        load_config(overrides=["method.alpah=1.2"])
    with pytest.raises(ValueError, match="train.iterations"):
        load_config(overrides=["train.iterations=lots"])


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  alpha: 1.2\n  time:\n    scheme: uniform\ntrain:\n  iterations: 7\n")
    config = load_config(path, ["--train.iterations=9", "method.kappa_teacher=2"])
    assert config.method.alpha == 1.2 and config.method.time.scheme == "uniform"
    assert config.train.iterations == 9 and config.method.kappa_teacher == 2.0
    assert load_config(overrides=[]).method.alpha == SiDConfig().method.alpha
    round_trip = tmp_path / "r.yaml"
    round_trip.write_text(dump_yaml(config))
    assert load_config(round_trip) == config


def test_missing_config_file():
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/nonexistent.yaml")
