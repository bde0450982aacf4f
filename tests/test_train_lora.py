"""LoRA fine-tuning with `examples/train_pmf.py` (`--lora_rank`, `--new_label_set`, ...). CPU only, tiny-test shape.

A tiny random base pipeline without a v-head (like the released checkpoints: exercises `--v_head_init copy`) is
saved to a temporary folder, then adapted for a few steps on a 4-class toy dataset.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel
from pmf_diffusers.loaders import ADAPTER_CONFIG_NAME, CLASS_EMBEDDINGS_NAME
from pmf_diffusers.training.lora import replace_class_table
from pmf_diffusers.training.toy_data import TOY_CLASS_FOLDERS
from conftest import load_train_script
from train_utils import TINY_TEST_PRESET, add_tiny_test_preset, make_toy_subset, recording_accelerator

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "train_pmf.py"
LORA_FILE = "pytorch_lora_weights.safetensors"


T = load_train_script("train_pmf_lora_under_test")
TRAINED: list[dict] = []  # {"model", "ema"} of each run, recorded at accelerator.end_training()


@pytest.fixture(autouse=True)
def _isolated(isolated_accelerate, monkeypatch):
    add_tiny_test_preset(monkeypatch)
    monkeypatch.setattr(T, "Accelerator", recording_accelerator(T.Accelerator, TRAINED))
    yield


def train(argv: list[str]) -> dict:
    """`main(parse_args(argv))`'s summary, with the trained model and EMAs."""
    return {**T.main(T.parse_args(argv)), **TRAINED[-1]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_lora")


@pytest.fixture(scope="module")
def shapes(workdir) -> Path:
    """4 classes × 8 images of 16×16, folders named after the classes (`red_circle`, ...)."""
    root = make_toy_subset(workdir / "toy", images_per_class=8, size=16)
    for folder in TOY_CLASS_FOLDERS[:4]:
        (root / folder).rename(root / folder[3:])  # "00_red_circle" -> "red_circle"
    (root / "metadata.json").unlink(missing_ok=True)
    return root


@pytest.fixture(scope="module")
def base(workdir) -> Path:
    """A tiny-test-shaped pipeline without a v-head, non-degenerate random weights, 4 named classes."""
    torch.manual_seed(3)
    config = {**TINY_TEST_PRESET.model, "num_classes": 4, "with_v_head": False}
    transformer = PMFTransformer2DModel(**config)
    with torch.no_grad():
        for param in transformer.parameters():
            param.add_(0.05 * torch.randn_like(param))
    names = {0: "blue square", 1: "green triangle", 2: "red circle", 3: "yellow plus"}
    path = workdir / "base"
    PMFPipeline(transformer, PMFScheduler(noise_scale=1.0), id2label=names, default_guidance_scale=2.0,
                default_guidance_interval=(0.0, 1.0)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_cache(workdir) -> Path:
    return workdir / "hf_cache"


def lora_args(output_dir: Path, data: Path, base: Path, cache: Path, *extra: str, steps: int = 3) -> list[str]:
    return [
        "--pretrained_model", str(base), "--preset", "tiny-test", "--train_data_dir", str(data),
        "--output_dir", str(output_dir), "--max_train_steps", str(steps), "--report_to", "none",
        "--validation_steps", "0", "--checkpointing_steps", "0", "--cache_dir", str(cache),
        "--lora_rank", "4", "--learning_rate", "1e-2", *extra,
    ]


def sample(pipe, labels, seed=0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(list(labels), generator=torch.Generator().manual_seed(seed), output_type="latent").images


def strip_lora_names(state_dict: dict) -> dict:
    return {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if ".lora_" not in k}


class FakeHfApi:
    calls: list = []

    def __init__(self, endpoint=None, token=None):
        FakeHfApi.calls.append(("init", endpoint, token))

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, private))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        FakeHfApi.calls.append(("upload_folder", repo_id, folder_path, files, commit_message))
        return type("Commit", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1", "pr_url": None})()


def test_lora_run_freezes_base_exports_ema_adapter_and_pushes(tmp_path, shapes, base, hf_cache, monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)

    out = tmp_path / "run"
    result = train(lora_args(out, shapes, base, hf_cache, "--push_to_hub", "--hub_model_id", "someone/pmf-lora",
                             "--hub_private"))
    assert result["global_step"] == 3 and result["pipeline_dir"] is None
    lora_dir = result["lora_dir"]
    assert lora_dir == out / "lora" and not (out / "pipeline").exists()

    # The base weights (v-head copied from the u-head) are untouched; only the LoRA tensors moved.
    model = result["model"]
    pretrained, _ = T.load_pretrained(str(base), "copy")
    expected = pretrained.state_dict()
    actual = strip_lora_names(model.state_dict())
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, _ in trainable)
    assert any(p.abs().max() > 0 for n, p in trainable if ".lora_B." in n)

    # The EMA covers only the adapter, and the exported adapter holds the EMA (not the raw) weights.
    ema = result["ema"]
    key = next(iter(ema.keys()))
    shadows = ema[key].shadow_params
    assert len(shadows) == len(trainable)
    saved = load_file(str(lora_dir / LORA_FILE))
    assert len(saved) == len(trainable)  # v-head LoRA kept (no --export_drop_v_head)
    for (name, param), shadow in zip(trainable, shadows):
        assert torch.equal(saved["transformer." + name.replace(".default.", ".")], shadow)
    assert any(not torch.equal(p, s) for (_, p), s in zip(trainable, shadows))

    # Small files: the adapter is a fraction of the base transformer; no class table (classes frozen).
    base_bytes = sum(f.stat().st_size for f in (base / "transformer").glob("*.safetensors"))
    assert (lora_dir / LORA_FILE).stat().st_size < 0.3 * base_bytes
    assert not (lora_dir / CLASS_EMBEDDINGS_NAME).exists()
    sidecar = json.loads((lora_dir / ADAPTER_CONFIG_NAME).read_text())
    assert sidecar["id2label"] is None and sidecar["base_model"]["num_classes"] == 4
    assert "name_or_path" not in sidecar["base_model"]  # a local path: not recorded

    # Loads on top of the base pipeline: samples change, and reloading is deterministic.
    labels = [0, 1, 2, 3]
    base_samples = sample(PMFPipeline.from_pretrained(base), labels)
    pipe = PMFPipeline.from_pretrained(base)
    pipe.load_lora_weights(lora_dir)
    adapted = sample(pipe, labels)
    assert not torch.allclose(adapted, base_samples)
    again = PMFPipeline.from_pretrained(base)
    again.load_lora_weights(lora_dir)
    assert torch.equal(sample(again, labels), adapted)

    # Model card and samples next to the adapter; the push uploads that folder.
    card = (lora_dir / "README.md").read_text()
    assert 'pipe.load_lora_weights("someone/pmf-lora")' in card and f'from_pretrained("{base}")' in card
    assert "tags:" in card and "- lora" in card and "trained from scratch" not in card
    assert (lora_dir / "samples.png").is_file()
    uploads = [c for c in FakeHfApi.calls if c[0] == "upload_folder"]
    assert FakeHfApi.calls[0] == ("init", None, "hf_fake_token_for_tests")
    assert ("create_repo", "someone/pmf-lora", True) in FakeHfApi.calls
    assert len(uploads) == 1 and uploads[0][1] == "someone/pmf-lora" and uploads[0][2] == str(lora_dir)
    assert {LORA_FILE, ADAPTER_CONFIG_NAME, "README.md"} <= set(uploads[0][3])

    args = json.loads((out / "training_args.json").read_text())["resolved"]
    assert args["lora"]["rank"] == 4 and args["lora"]["alpha"] == 4.0 and args["lora"]["target"] == "attention+mlp"
    assert args["num_trainable_parameters"] == sum(p.numel() for _, p in trainable)


def test_new_label_set_resumes_bit_for_bit_and_reloads_with_its_names(tmp_path, shapes, base, hf_cache):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# my shapes\npurple star\nyellow plus\nred circle\nblue square, box\ngreen triangle\n")
    names = {0: "purple star", 1: "yellow plus", 2: "red circle", 3: "blue square, box", 4: "green triangle"}
    common = ("--new_label_set", str(labels_file), "--checkpointing_steps", "2", "--lora_target", "attention",
              "--export_drop_v_head")
    straight = train(lora_args(tmp_path / "a", shapes, base, hf_cache, *common, steps=4))
    resumed = train(lora_args(tmp_path / "b", shapes, base, hf_cache, *common, "--resume_from_checkpoint",
                              str(tmp_path / "a" / "checkpoint-2"), steps=4))
    assert resumed["global_step"] == 4 and len(resumed["history"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(straight["model"].parameters(), resumed["model"].parameters()))
    for key in straight["ema"].keys():
        pairs = zip(straight["ema"][key].shadow_params, resumed["ema"][key].shadow_params)
        assert all(torch.equal(a, b) for a, b in pairs)

    # The adapter: LoRA (no v-head part) + the 5 + 1 row class table + the names.
    lora_dir = straight["lora_dir"]
    sidecar = json.loads((lora_dir / ADAPTER_CONFIG_NAME).read_text())
    assert {int(k): v for k, v in sidecar["id2label"].items()} == names
    table = load_file(str(lora_dir / CLASS_EMBEDDINGS_NAME))["class_embedder.weight"]
    assert table.shape[0] == 6
    assert not any("v_head" in k or "v_proj" in k for k in load_file(str(lora_dir / LORA_FILE)))

    # Dataset folders were mapped by name: "purple star" (id 0) has no images, so its row is still the initial one.
    initial = T.load_pretrained(str(base), "copy")[0]
    replace_class_table(initial, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(table[0], initial.class_embedder.weight[0].detach())
    assert all(not torch.equal(table[k], initial.class_embedder.weight[k].detach()) for k in (1, 2, 3, 4))

    pipe = PMFPipeline.from_pretrained(base)
    pipe.load_lora_weights(lora_dir)
    assert pipe.id2label == names and pipe.transformer.config.num_classes == 5
    assert sample(pipe, ["red circle", "box"]).shape == (2, 3, 16, 16)

    # A resume with other LoRA settings is refused with a clear message.
    with pytest.raises(T.CheckpointError, match="trained with .*rank"):
        T.main(T.parse_args(lora_args(tmp_path / "c", shapes, base, hf_cache, "--new_label_set", str(labels_file),
                                      "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-2"), steps=4)))


def test_remapped_collator():
    collator = T.RemappedCollator(lambda rows: {"class_labels": torch.tensor(rows)}, [3, 4, 2, 1])
    assert collator([0, 1, 2, 3, 0])["class_labels"].tolist() == [3, 4, 2, 1, 3]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora_rank", "0"], "--lora_rank must be a positive integer"),
        (["--lora_rank", "-2"], "--lora_rank must be a positive integer"),
        (["--lora_rank", "4", "--no-pretrained"], "--lora_rank .* needs --pretrained_model"),
        (["--lora_alpha", "8"], "--lora_alpha only applies to LoRA"),
        (["--train_class_embeddings"], "only applies to LoRA"),
        (["--lora_rank", "4", "--lora_alpha", "0"], "--lora_alpha must be a positive number"),
        (["--new_label_set", "labels.txt", "--no-pretrained"], "--new_label_set needs --pretrained_model"),
        (["--new_label_set", "missing.txt"], "no such file"),
    ],
)
def test_bad_flags_are_refused_at_parse_time(tmp_path, base, capsys, extra, message):
    (tmp_path / "labels.txt").write_text("a\nb\n")
    argv = ["--preset", "tiny-test", "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    if "--no-pretrained" in extra:
        extra = [e for e in extra if e != "--no-pretrained"]
    else:
        argv += ["--pretrained_model", str(base)]
    extra = [str(tmp_path / e) if e.endswith(".txt") else e for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        T.parse_args(argv + extra)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_bad_targets_and_label_sets_fail_before_training(tmp_path, shapes, base, hf_cache, capsys):
    # An unknown target: exit status 2 and resolve_lora_targets' message (with the available modules).
    code = T.cli(lora_args(tmp_path / "t", shapes, base, hf_cache, "--lora_target", "to_q,not_a_layer"))
    err = capsys.readouterr().err
    assert code == 2 and "['not_a_layer'] match no nn.Linear" in err and "attn.to_q" in err
    assert not (tmp_path / "t" / "training_args.json").exists()

    duplicates = tmp_path / "dup.txt"
    duplicates.write_text("red circle\nblue square\nRed Circle\n")
    code = T.cli(lora_args(tmp_path / "d", shapes, base, hf_cache, "--new_label_set", str(duplicates)))
    assert code == 2 and "duplicate class names" in capsys.readouterr().err

    partial = tmp_path / "partial.txt"
    partial.write_text("red circle\nblue square\n")
    with pytest.raises(T.TrainingSetupError, match="'green_triangle' \\(no match\\)"):
        T.main(T.parse_args(lora_args(tmp_path / "p", shapes, base, hf_cache, "--new_label_set", str(partial))))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
