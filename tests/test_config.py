import textwrap
from pathlib import Path

import pytest

from dmlkit.config import ConfigError, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    write(
        tmp_path / "base.yaml",
        """
        seed: 1
        competition: {name: humpback-2019, root: input/x}
        member_defaults:
          image_size: 64
          train: {epochs: 3, lr: 0.001}
        retrieve: {k: 50, qe: {enabled: false, alpha: 3.0}}
    """,
    )
    write(
        tmp_path / "exp.yaml",
        """
        base: base.yaml
        experiment: exp
        member_defaults:
          train: {epochs: 5}
        members:
          - {name: a, backbone: resnet18, fold: 0}
          - {name: b, backbone: resnet34, fold: 1, image_size: 128, train: {lr: 0.01}}
        retrieve: {qe: {enabled: true}}
    """,
    )
    return tmp_path


def test_inheritance_merges_dicts_and_member_defaults(configs):
    cfg = load_config(configs / "exp.yaml")
    assert cfg.seed == 1 and cfg.experiment == "exp"
    assert cfg.retrieve.k == 50 and cfg.retrieve.qe.enabled and cfg.retrieve.qe.alpha == 3.0
    a, b = cfg.members
    assert (a.image_size, a.train.epochs, a.train.lr) == (64, 5, 0.001)
    assert (b.image_size, b.train.epochs, b.train.lr) == (128, 5, 0.01)


def test_dotted_overrides_including_list_items(configs):
    cfg = load_config(
        configs / "exp.yaml",
        ["members.1.train.epochs=9", "retrieve.k=7", "seed=5", "member_defaults.head.subcenters=1"],
    )
    assert cfg.members[1].train.epochs == 9 and cfg.members[0].train.epochs == 5
    assert cfg.retrieve.k == 7 and cfg.seed == 5
    assert all(m.head.subcenters == 1 for m in cfg.members)


def test_unknown_key_names_file_and_key(configs):
    write(configs / "bad.yaml", "base: exp.yaml\nretrieve: {qe: {alpah: 2}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(configs / "bad.yaml")
    assert "bad.yaml" in str(err.value) and "retrieve.qe.alpah" in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_names_the_base_file_it_came_from(configs):
    write(configs / "base.yaml", (configs / "base.yaml").read_text().replace("seed: 1", "seed: many"))
    with pytest.raises(ConfigError) as err:
        load_config(configs / "exp.yaml")
    assert "base.yaml" in str(err.value) and "'seed'" in str(err.value) and "integer" in str(err.value)


def test_wrong_type_in_member_defaults_names_member_key(configs):
    with pytest.raises(ConfigError) as err:
        load_config(configs / "exp.yaml", ["member_defaults.train.epochs=lots"])
    assert "members.0.train.epochs" in str(err.value) and "command line" in str(err.value)


def test_missing_required_value(configs):
    write(configs / "nomember.yaml", "base: base.yaml\nexperiment: e\nmembers:\n  - {name: a, fold: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(configs / "nomember.yaml")
    assert "members.0.backbone" in str(err.value) and "missing" in str(err.value)


def test_semantic_errors(configs):
    with pytest.raises(ConfigError, match="fold 7"):
        load_config(configs / "exp.yaml", ["members.0.fold=7"])
    with pytest.raises(ConfigError, match="duplicate member name"):
        load_config(configs / "exp.yaml", ["members.1.name=a"])
    with pytest.raises(ConfigError, match="init_from unknown member"):
        load_config(configs / "exp.yaml", ["members.1.init_from=zz"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.yaml")
    write(tmp_path / "ok.yaml", "experiment: e\n")
    write(tmp_path / "broken.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config(tmp_path / "ok.yaml", ["novalue"])


SHIPPED = sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    cfg = load_config(Path(__file__).parents[1] / "configs" / name)
    assert cfg.members
