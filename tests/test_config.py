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
    with pytest.raises(ConfigError, match=r"init_from 'a' needs the same backbone \(resnet34 vs resnet18\)"):
        load_config(configs / "exp.yaml", ["members.1.init_from=a"])  # refused before member a trains


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("embed.tta_scales=[]", "embed.tta_scales"),
        ("embed.tta_scales=[0]", "embed.tta_scales"),
        ("threads=-1", "threads"),
        ("threads=0", "threads"),
        ("folds.seed=-1", "folds.seed"),
        ("retrieve.index=flat_bf16", "retrieve.index"),  # removed: slower than faiss on every CPU measured
    ],
)
def test_values_that_crashed_later_stop_at_load_naming_the_key(configs, override, key):
    """Before: tta_scales=[] passed and crashed after training; threads=-1 and folds.seed=-1 gave tracebacks."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(configs / "exp.yaml", [override])


@pytest.mark.parametrize(
    ("overrides", "competition", "message"),
    [
        (
            ["member_defaults.head.dynamic=glr3", "member_defaults.head.margin=0.4"],
            "humpback-2019",
            "members.0.head.margin: no effect while head.dynamic",
        ),
        (["member_defaults.head.dynamic_lambda=-0.3"], "humpback-2019", "members.0.head.dynamic_lambda: only"),
        (["ensemble.pca_dim=64"], "humpback-2019", "ensemble.pca_dim: no effect while ensemble.pca_whiten"),
        (["retrieve.nprobe=8"], "humpback-2019", "retrieve.nprobe: only retrieve.index 'ivf'"),
        (["member_defaults.train.lr_scaling=linear"], "humpback-2019", "members.0.train.lr_scaling: no effect while"),
        (["retrieve.unknown_threshold=0.3"], "landmark-recognition-2020", "retrieve.unknown_threshold: only MAP@5"),
        (["retrieve.voting.head_weight=0.5"], "landmark-retrieval", "retrieve.voting.head_weight"),
        (["retrieve.penalty.enabled=true"], "landmark-retrieval", "retrieve.penalty.enabled"),
        (
            ["retrieve.verify.fusion=calibrated", "retrieve.verify.cap=20"],
            "landmark-recognition-2020",
            "retrieve.verify.cap: only retrieve.verify.fusion 'additive'",
        ),
        (["retrieve.label_rerank.enabled=true"], "humpback-2019", "retrieve.label_rerank.enabled: it re-ranks index"),
        (
            ["retrieve.verify.top_k=20"],
            "humpback-2019",
            "retrieve.verify.top_k: no effect while retrieve.verify.enabled",
        ),
        (
            ["retrieve.verify.enabled=true", "retrieve.verify.top_k=200"],
            "landmark-recognition-2020",
            "retrieve.verify.top_k: 200 candidates, but the search keeps retrieve.k = 50 per query",
        ),
        (
            ["retrieve.label_rerank.min_score=0.5"],
            "landmark-retrieval",
            "retrieve.label_rerank.min_score: no effect while retrieve.label_rerank.enabled is false",
        ),
        (["member_defaults.embedding_size=16", "member_defaults.see.enabled=true"], "humpback-2019", "see.n_expansion"),
        (
            ["member_defaults.see.enabled=true", "member_defaults.see.lower_bound=0.3"],
            "humpback-2019",
            "members.0.see.lower_bound: only see.schedule 'threshold'",
        ),
        (
            ["member_defaults.see.enabled=true", "member_defaults.see.schedule=threshold"],
            "humpback-2019",
            "members.0.see.start/end: the threshold falls from see.start to see.end",
        ),
        (
            ["member_defaults.see.enabled=true", "member_defaults.see.end=1.5"],
            "humpback-2019",
            "members.0.see.end: a fraction of the batch in",
        ),
    ],
)
def test_values_without_effect_are_refused_before_anything_runs(configs, overrides, competition, message):
    from dmlkit.pipeline.checks import check_values
    from dmlkit.pipeline.context import Context

    cfg = load_config(configs / "exp.yaml", [f"competition.name={competition}", *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_values(Context(cfg))


def test_values_with_effect_pass_and_cpu_fp16_is_a_warning(configs, caplog):
    from dmlkit.pipeline.checks import check_values
    from dmlkit.pipeline.context import Context

    fixed = ["member_defaults.head.dynamic=none", "member_defaults.head.margin=0.4", "retrieve.unknown_threshold=0.3"]
    check_values(Context(load_config(configs / "exp.yaml", fixed)))
    check_values(Context(load_config(configs / "exp.yaml", ["retrieve.index=ivf", "retrieve.nprobe=8"])))
    retrieval = ["competition.name=landmark-retrieval", "retrieve.label_rerank.enabled=true"]
    verify = ["retrieve.verify.enabled=true", "retrieve.verify.weight=0.5", "retrieve.verify.cap=20"]
    check_values(
        Context(load_config(configs / "exp.yaml", [*retrieval, *verify, "retrieve.label_rerank.min_score=0.5"]))
    )
    falling = ["schedule=threshold", "start=0.9", "end=0.5", "lower_bound=0.6", "enabled=true", "gradient=backbone"]
    check_values(Context(load_config(configs / "exp.yaml", [f"member_defaults.see.{o}" for o in falling])))
    with caplog.at_level("WARNING"):
        check_values(Context(load_config(configs / "exp.yaml", ["members.1.train.amp=fp16"])))
    assert "members.1.train.amp: fp16 runs as bf16 on the CPU" in caplog.text


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
    from dmlkit.pipeline.checks import check_values
    from dmlkit.pipeline.context import Context

    cfg = load_config(Path(__file__).parents[1] / "configs" / name)
    assert cfg.members
    check_values(Context(cfg))  # no value without effect


def test_demos_train_plain_arcface_and_competition_configs_keep_their_winners_recipe():
    """Defaults follow the recipe benchmark (benchmarks/README.md, "Does the recipe pay?"): plain ArcFace; the
    configs that copy a winner set sub-centers and dynamic margins themselves."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("whale-demo", "landmark-demo", "omniglot"):
        head = load_config(configs / f"{name}.yaml").members[0].head
        assert (head.type, head.subcenters, head.dynamic, head.margin) == ("arcface", 1, "none", 0.3), name
        assert not load_config(configs / f"{name}.yaml").members[0].see.enabled
    glr = load_config(configs / "glr2020.yaml").members[0].head
    assert (glr.subcenters, glr.dynamic) == (3, "glr3")
    whale = load_config(configs / "happywhale-2022.yaml").members[0].head
    assert (whale.subcenters, whale.dynamic) == (3, "power")


def test_amp_auto_uses_bf16_on_the_cpu_only_where_it_is_native(monkeypatch):
    """Emulated bf16 ran a train step 2× (AVX-512 without BF16) to 9× (AVX2) slower than fp32, so
    `amp: auto` reads the CPU's flags; an explicit `bf16` is kept."""
    import torch

    from dmlkit import inference

    sapphire_rapids = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    zen4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
    zen3 = "flags\t\t: fpu sse avx avx2 fma\n"
    skylake_x = "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
    graviton3 = "Features\t: fp asimd evtstrm aes sve bf16 i8mm\n"
    graviton2 = "Features\t: fp asimd evtstrm aes asimddp\n"
    assert [inference.cpu_has_native_bf16(c) for c in (sapphire_rapids, zen4, graviton3)] == [True] * 3
    assert [inference.cpu_has_native_bf16(c) for c in (zen3, skylake_x, graviton2, "")] == [False] * 4
    cpu = torch.device("cpu")
    for native, expected in ((True, torch.bfloat16), (False, None)):
        inference._cpu_auto_dtype.cache_clear()
        monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda native=native: native)
        assert inference.autocast_dtype(cpu, "auto") is expected
        assert inference.autocast_dtype(cpu, "bf16") is torch.bfloat16
        assert inference.autocast_dtype(cpu, "off") is None
    inference._cpu_auto_dtype.cache_clear()


def test_every_config_key_says_what_it_does():
    """Each field of the schema carries a description (what the configuration reference shows)."""
    import typing

    from pydantic import BaseModel

    from dmlkit.config.schema import Config

    missing, seen = [], set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{field.alias or name}"
            if not field.description:
                missing.append(key)
            for outer in (field.annotation, *typing.get_args(field.annotation)):
                for inner in (outer, *typing.get_args(outer)):
                    if isinstance(inner, type) and issubclass(inner, BaseModel) and (key, inner) not in seen:
                        seen.add((key, inner))
                        walk(inner, key + ".")

    walk(Config, "")
    assert len(seen) > 20 and not missing, missing
