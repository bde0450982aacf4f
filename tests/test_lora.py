"""LoRA fine-tuning (peft): training only moves the adapter, save/load round trips, fuse/unfuse, adapter switching,
new label sets (class table + id2label in their own files), and clear errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import max_rel_err

from pmf_diffusers import PMFPipeline, PMFScheduler, PMFTransformer2DModel
from pmf_diffusers.lora import (
    ADAPTER_CONFIG_NAME,
    CLASS_EMBEDDINGS_NAME,
    PMF_LORA_TARGETS,
    add_pmf_lora,
    init_v_head_from_u_head,
    label_set_index,
    load_pmf_lora_state,
    pmf_base_model_info,
    read_label_set,
    replace_class_table,
    resolve_lora_targets,
    save_pmf_lora,
)
from pmf_diffusers.training import PMFLossConfig, pmf_loss
from test_pipeline_inputs import assert_payload_is_live, save_pickle_with_code

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(
    sample_size=32, patch_size=8, num_layers=1, num_head_layers=1, num_attention_heads=2, attention_head_dim=16,
    mlp_hidden_dim=64, bottleneck_dim=16, num_classes=4, with_v_head=True,
)
BASE_NAMES = {0: "apple", 1: "banana", 2: "cherry", 3: "date"}
_BASE_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}


def base_state_dict(**overrides) -> dict[str, torch.Tensor]:
    """Random, non-degenerate weights (the official init zeroes the gates and the output layers). Without a v-head:
    the same weights minus the v-head."""
    if overrides.get("with_v_head") is False:
        full = base_state_dict(**{**overrides, "with_v_head": True})
        return {k: v for k, v in full.items() if not k.startswith(("v_head_blocks.", "v_norm_out.", "v_proj_out."))}
    config = {**TINY, **overrides}
    key = tuple(sorted(config.items()))
    if key not in _BASE_CACHE:
        torch.manual_seed(0)
        model = PMFTransformer2DModel(**config)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.1)
        _BASE_CACHE[key] = {name: value.clone() for name, value in model.state_dict().items()}
    return {name: value.clone() for name, value in _BASE_CACHE[key].items()}


def make_transformer(**overrides) -> PMFTransformer2DModel:
    model = PMFTransformer2DModel(**{**TINY, **overrides})
    model.load_state_dict(base_state_dict(**overrides))
    return model.eval()


def make_pipe(transformer=None, id2label=BASE_NAMES, **overrides) -> PMFPipeline:
    pipe = PMFPipeline(transformer if transformer is not None else make_transformer(**overrides), PMFScheduler(),
                       id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, labels=(0, 1, 4), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(list(labels), generator=generator, output_type="latent").images


def train(transformer, steps=3, num_classes=4, seed=0, lr=1e-2):
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    config = PMFLossConfig(lpips_lambda=0.0, convnext_lambda=0.0)
    transformer.train()
    for _ in range(steps):
        images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
        labels = torch.randint(0, num_classes, (2,), generator=generator)
        loss = pmf_loss(transformer, images, labels, config, generator=generator).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    transformer.eval()
    return loss.item()


def random_adapter(adapter_name="b", rank=2, seed=1, **model_overrides) -> PMFTransformer2DModel:
    """An adapter with random (non-zero) B, without training."""
    transformer = make_transformer(**model_overrides)
    add_pmf_lora(transformer, rank=rank, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return transformer


@pytest.fixture(scope="module")
def trained():
    """A rank-4, alpha-8 attention+mlp adapter trained for 3 steps of the real objective."""
    transformer = make_transformer()
    before = {name: value.clone() for name, value in transformer.state_dict().items()}
    trainable = add_pmf_lora(transformer, rank=4, alpha=8)
    loss = train(transformer, steps=3)
    return {"transformer": transformer, "before": before, "trainable": trainable, "loss": loss}


@pytest.fixture(scope="module")
def base_sample():
    return sample(make_pipe())


@pytest.fixture(scope="module")
def saved_adapter(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    save_pmf_lora(trained["transformer"], folder)
    return folder


# --------------------------------------------------------------------------------------------------------------
# Training moves only the adapter
# --------------------------------------------------------------------------------------------------------------
def test_training_changes_only_the_adapter(trained, base_sample):
    transformer = trained["transformer"]
    assert trained["trainable"] and all("lora_" in name for name in trained["trainable"])
    # LoRA on the trunk, the u-head and the v-head, for all seven linears of each block.
    for block in ("transformer_blocks.0", "u_head_blocks.0", "v_head_blocks.0"):
        for target in PMF_LORA_TARGETS["attention+mlp"]:
            assert any(name.startswith(f"{block}.{target}.lora_A") for name in trained["trainable"]), (block, target)

    after = {
        name.replace(".base_layer", ""): value
        for name, value in transformer.state_dict().items()
        if "lora_" not in name
    }
    assert after.keys() == trained["before"].keys()
    for name, value in trained["before"].items():
        assert torch.equal(after[name], value), name
    assert any(
        param.abs().max() > 0 for name, param in transformer.named_parameters() if "lora_B" in name
    ), "training did not move the adapter"

    pipe = make_pipe(transformer)
    adapted = sample(pipe)
    assert not torch.equal(adapted, base_sample)
    pipe.transformer.disable_adapters()
    assert torch.equal(sample(pipe), base_sample)
    pipe.transformer.enable_adapters()
    assert torch.equal(sample(pipe), adapted)


def test_add_pmf_lora_presets_and_targets():
    transformer = make_transformer()
    names = add_pmf_lora(transformer, rank=2, targets="attention")
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names} == {"to_q", "to_k", "to_v", "to_out"}
    assert all(not p.requires_grad for n, p in transformer.named_parameters() if "lora_" not in n)

    transformer = make_transformer()
    names = add_pmf_lora(transformer, rank=2, targets="all-linear", train_class_embeddings=True)
    assert "class_embedder.weight" in names
    assert any(name.startswith("u_proj_out.lora_A") for name in names)
    assert any(name.startswith("delta_time_embedder.embedder.linear_2.lora_A") for name in names)
    # A preset entry the model lacks (no v-head → no v_proj_out) is dropped, not an error.
    assert "v_proj_out" not in resolve_lora_targets(make_transformer(with_v_head=False), "all-linear")
    assert resolve_lora_targets(make_transformer(), "to_q, ff.down_proj") == ["to_q", "ff.down_proj"]


def test_v_head_from_u_head_for_checkpoints_without_one(tmp_path):
    """Released checkpoints have no v-head; loaded for training with the default low_cpu_mem_usage it is meta."""
    make_transformer(with_v_head=False).save_pretrained(tmp_path / "transformer")
    transformer = PMFTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer", with_v_head=True)
    with pytest.raises(ValueError, match="meta"):
        add_pmf_lora(transformer, rank=2)
    init_v_head_from_u_head(transformer)
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.9])
    x_u, x_v = transformer(z, timestep=t, r_timestep=t, class_labels=torch.tensor([0, 4]), guidance=torch.tensor(
        [1.0, 3.0]), head="both", return_dict=False)
    assert torch.equal(x_u, x_v)  # u-head at h = 0 is what the v-head learns
    add_pmf_lora(transformer, rank=2)
    with pytest.raises(ValueError, match="before adding LoRA"):
        init_v_head_from_u_head(transformer)


# --------------------------------------------------------------------------------------------------------------
# Save / load / fuse / switch
# --------------------------------------------------------------------------------------------------------------
def test_saved_files_are_small_and_standard(saved_adapter, trained):
    files = sorted(path.name for path in saved_adapter.iterdir())
    assert files == [ADAPTER_CONFIG_NAME, "pytorch_lora_weights.safetensors"]  # no class table: it was not trained
    with safe_open(saved_adapter / "pytorch_lora_weights.safetensors", "pt") as handle:
        keys = list(handle.keys())
        header = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert keys and all("lora" in key and key.startswith("transformer.") for key in keys)
    assert header["transformer.r"] == 4 and header["transformer.lora_alpha"] == 8
    num_lora = sum(p.numel() for n, p in trained["transformer"].named_parameters() if "lora_" in n)
    num_base = sum(v.numel() for v in trained["before"].values())
    assert num_lora < num_base / 4
    sidecar = json.loads((saved_adapter / ADAPTER_CONFIG_NAME).read_text())
    assert sidecar["base_model"]["hidden_size"] == 32 and sidecar["base_model"]["num_classes"] == 4
    assert sidecar["class_embeddings"] is None and sidecar["id2label"] is None


def test_save_load_round_trip_reproduces_samples(saved_adapter, trained):
    expected = sample(make_pipe(trained["transformer"]))
    pipe = make_pipe()
    pipe.load_lora_weights(saved_adapter, adapter_name="a")
    assert torch.equal(sample(pipe), expected)
    assert pipe.get_active_adapters() == ["a"]
    # Into a model built without the v-head (like the released checkpoints): the v-head LoRA is dropped.
    pipe = make_pipe(with_v_head=False)
    pipe.load_lora_weights(saved_adapter)
    assert torch.equal(sample(pipe), expected)


def test_fuse_unfuse_and_disable(saved_adapter, base_sample):
    pipe = make_pipe()
    pipe.load_lora_weights(saved_adapter, adapter_name="a")
    unfused = sample(pipe)
    # Weight 0 or a disabled adapter gives the base model exactly.
    pipe.set_adapters("a", 0.0)
    assert torch.equal(sample(pipe), base_sample)
    pipe.set_adapters("a", 1.0)
    assert torch.equal(sample(pipe), unfused)
    pipe.transformer.disable_adapters()
    assert torch.equal(sample(pipe), base_sample)
    pipe.transformer.enable_adapters()
    pipe.disable_lora()
    assert torch.equal(sample(pipe), base_sample)
    pipe.enable_lora()
    assert torch.equal(sample(pipe), unfused)

    weight = pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    base_weight = weight.detach().clone()
    pipe.fuse_lora()
    assert not torch.equal(weight, base_weight)
    assert max_rel_err(sample(pipe), unfused) <= 1e-5
    pipe.unfuse_lora()  # W + ΔW − ΔW: equal up to rounding
    assert max_rel_err(weight, base_weight) <= 1e-6
    assert max_rel_err(sample(pipe), unfused) <= 1e-5
    pipe.unload_lora_weights()
    assert max_rel_err(sample(pipe), base_sample) <= 1e-5


def test_fused_qkv_projections_and_lora(saved_adapter):
    pipe = make_pipe()
    pipe.load_lora_weights(saved_adapter, adapter_name="a")
    with_lora = sample(pipe)
    # to_qkv would be a plain copy of the base weights and silently bypass the adapter.
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        pipe.transformer.fuse_qkv_projections()
    # The supported order: merge the adapter into the weights, drop the LoRA layers, then fuse.
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.transformer.fuse_qkv_projections()
    assert max_rel_err(sample(pipe), with_lora) <= 1e-5

    # Adapters loaded after fusing are caught at the first call.
    fused_first = make_pipe()
    fused_first.transformer.fuse_qkv_projections()
    fused_first.load_lora_weights(saved_adapter, adapter_name="a")
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        sample(fused_first)
    fused_first.transformer.unfuse_qkv_projections()
    assert torch.equal(sample(fused_first), with_lora)


def test_multiple_adapters(saved_adapter, tmp_path, base_sample):
    save_pmf_lora(random_adapter("b"), tmp_path / "b", adapter_name="b")
    pipe = make_pipe()
    pipe.load_lora_weights(saved_adapter, adapter_name="a")
    pipe.load_lora_weights(tmp_path / "b", adapter_name="b")
    pipe.set_adapters("a")
    only_a = sample(pipe)
    pipe.set_adapters("b")
    only_b = sample(pipe)
    pipe.set_adapters(["a", "b"], [1.0, 0.0])
    assert torch.equal(sample(pipe), only_a)
    pipe.set_adapters(["a", "b"], [0.0, 0.0])
    assert torch.equal(sample(pipe), base_sample)
    pipe.set_adapters(["a", "b"], [0.7, 0.5])
    mixed = sample(pipe)
    assert not torch.equal(mixed, only_a) and not torch.equal(mixed, only_b)
    pipe.fuse_lora(adapter_names=["a", "b"])
    assert max_rel_err(sample(pipe), mixed) <= 1e-5
    pipe.unfuse_lora()
    pipe.delete_adapters("b")
    pipe.set_adapters("a")
    assert max_rel_err(sample(pipe), only_a) <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# New label sets
# --------------------------------------------------------------------------------------------------------------
def test_replace_class_table_initialisation():
    transformer = make_transformer()
    old = transformer.class_embedder.weight.detach().clone()
    table = replace_class_table(transformer, 3, generator=torch.Generator().manual_seed(0)).weight
    assert table.shape == (4, 32) and table.requires_grad and transformer.config.num_classes == 3
    assert torch.equal(table[3], old[4])  # the null row is kept
    noise = (table[:3] - old[4]).detach()
    assert 0 < noise.std() < 0.05 * old[4].std()  # null row + N(0, (0.02·std)²)
    assert pmf_base_model_info(transformer)["num_classes"] == 4

    transformer = make_transformer()
    table = replace_class_table(transformer, 2, init=[3, None]).weight
    assert torch.equal(table[0], old[3]) and torch.equal(table[2], old[4])
    with pytest.raises(ValueError, match="pretrained class id"):
        replace_class_table(make_transformer(), 2, init=[4, 0])
    with pytest.raises(ValueError, match="2 new classes"):
        replace_class_table(make_transformer(), 2, init=[0])


def test_new_label_set_round_trip(tmp_path, base_sample):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# my shapes\nred square\nBlue circle\n\ngreen triangle, pyramid\n")
    id2label = read_label_set(labels_file)
    assert id2label == {0: "red square", 1: "Blue circle", 2: "green triangle, pyramid"}

    transformer = make_transformer()
    replace_class_table(transformer, len(id2label), generator=torch.Generator().manual_seed(0))
    trainable = add_pmf_lora(transformer, rank=2)  # after the table: it stays trainable
    assert "class_embedder.weight" in trainable
    table_before = transformer.class_embedder.weight.detach().clone()
    train(transformer, steps=2, num_classes=3)
    assert not torch.equal(transformer.class_embedder.weight, table_before)
    save_pmf_lora(transformer, tmp_path / "shapes", id2label=id2label)
    assert (tmp_path / "shapes" / CLASS_EMBEDDINGS_NAME).is_file()
    expected = sample(make_pipe(transformer, id2label=id2label), labels=("blue circle", "pyramid", 3))

    pipe = make_pipe()
    pipe.load_lora_weights(tmp_path / "shapes")
    assert pipe.id2label == id2label and pipe.config.id2label == id2label
    assert pipe.num_classes == 3 and pipe.transformer.config.num_classes == 3
    assert torch.equal(pipe.transformer.class_embedder.weight, transformer.class_embedder.weight)
    assert torch.equal(sample(pipe, labels=("blue circle", "pyramid", "unconditional")), expected)
    with pytest.raises(ValueError, match="out of range"):
        pipe(3 + 1)
    # A second adapter with its own table must not silently replace the first one's.
    with pytest.raises(ValueError, match="already replaced the class table"):
        pipe.load_lora_weights(tmp_path / "shapes", adapter_name="again")

    # Resuming training from the export: same setup, then load_pmf_lora_state.
    resumed = make_transformer()
    add_pmf_lora(resumed, rank=2)
    replace_class_table(resumed, 3)
    load_pmf_lora_state(resumed, tmp_path / "shapes")
    for (name, value), (other_name, other) in zip(transformer.state_dict().items(), resumed.state_dict().items()):
        assert name == other_name and torch.equal(value, other), name
    assert label_set_index(id2label, ["Green_Triangle", "red square", "BLUE CIRCLE"]) == [2, 0, 1]
    with pytest.raises(ValueError, match="'hexagon' \\(no match\\)"):
        label_set_index(id2label, ["hexagon"])

    pipe.unload_lora_weights()  # back to the base model, names and table included
    assert pipe.num_classes == 4 and pipe.id2label == BASE_NAMES
    assert torch.equal(sample(pipe), base_sample)

    # fuse + unload bakes the adapter in: a standalone pipeline with the new classes.
    pipe.load_lora_weights(tmp_path / "shapes")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert pipe.num_classes == 3 and pipe.id2label == id2label
    pipe.save_pretrained(tmp_path / "baked")
    assert json.loads((tmp_path / "baked" / "model_index.json").read_text())["id2label"]["1"] == "Blue circle"
    baked = PMFPipeline.from_pretrained(tmp_path / "baked")
    baked.set_progress_bar_config(disable=True)
    assert baked.transformer.config.num_classes == 3
    assert max_rel_err(sample(baked, labels=("blue circle", "pyramid", "unconditional")), expected) <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------
def test_adapter_for_another_base_is_rejected(saved_adapter, tmp_path):
    pipe = make_pipe(attention_head_dim=32)
    with pytest.raises(ValueError, match=r"different base model.*hidden_size = 32 .* vs 64"):
        pipe.load_lora_weights(saved_adapter)
    assert not getattr(pipe.transformer, "peft_config", None)  # nothing was loaded

    # Without the sidecar (a bare LoRA file): the tensor shapes are checked.
    bare = tmp_path / "bare"
    bare.mkdir()
    lora_file = "pytorch_lora_weights.safetensors"
    (bare / lora_file).write_bytes((saved_adapter / lora_file).read_bytes())
    with pytest.raises(ValueError, match="does not fit this model's shape.*shape mismatches"):
        pipe.load_lora_weights(bare)
    # A deeper base: modules this model does not have (peft alone would only warn).
    deep = tmp_path / "deep"
    save_pmf_lora(random_adapter(num_layers=2), deep, adapter_name="b")
    (deep / ADAPTER_CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match="modules the model does not have.*transformer_blocks.1"):
        make_pipe().load_lora_weights(deep)
    # Same shapes, different base class count.
    with pytest.raises(ValueError, match="num_classes = 4 .* vs 10"):
        make_pipe(num_classes=10).load_lora_weights(saved_adapter)


@pytest.mark.parametrize("rank", [0, -4, 2.5])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        add_pmf_lora(make_transformer(), rank=rank)


def test_unknown_target_lists_the_available_modules():
    with pytest.raises(ValueError, match=r"\['to_qq'\] match no nn.Linear.*attn.to_q.*ff.gate_proj.*u_proj_out"):
        add_pmf_lora(make_transformer(), rank=4, targets="to_qq,to_k")


def test_bad_label_sets(tmp_path, trained):
    duplicates = tmp_path / "dup.txt"
    duplicates.write_text("Cat\ndog\ncat\n")
    with pytest.raises(ValueError, match=r"duplicate class names.*'cat' \(classes 0 and 2\)"):
        read_label_set(duplicates)
    as_json = tmp_path / "labels.json"
    as_json.write_text(json.dumps(["cat", "dog"]))
    assert read_label_set(as_json, num_classes=2) == {0: "cat", 1: "dog"}
    with pytest.raises(ValueError, match="2 class names but the class table has 3 classes"):
        read_label_set(as_json, num_classes=3)
    reserved = tmp_path / "reserved.txt"
    reserved.write_text("cat\nunconditional\n")
    with pytest.raises(ValueError, match="reserves"):
        read_label_set(reserved)

    # A saved adapter whose label set disagrees with its table: refused before anything is loaded.
    transformer = random_adapter()
    replace_class_table(transformer, 3)
    folder = tmp_path / "tampered"
    save_pmf_lora(transformer, folder, adapter_name="b", id2label={0: "a", 1: "b", 2: "c"})
    sidecar = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    sidecar["id2label"] = {"0": "a", "1": "b"}
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(sidecar))
    pipe = make_pipe()
    with pytest.raises(ValueError, match="2 class names but the class table has 3 classes"):
        pipe.load_lora_weights(folder)
    assert pipe.num_classes == 4 and not getattr(pipe.transformer, "peft_config", None)
    with pytest.raises(ValueError, match="2 class names but the class table has 3"):
        save_pmf_lora(transformer, tmp_path / "bad", adapter_name="b", id2label={0: "a", 1: "b"})


# --------------------------------------------------------------------------------------------------------------
# Loading: incomplete, corrupt and foreign adapter files
# --------------------------------------------------------------------------------------------------------------
LORA_FILE = "pytorch_lora_weights.safetensors"


def rewrite_lora_file(folder, change):
    """Apply `change(state_dict)` to a saved LoRA file, keeping its peft header."""
    from safetensors.torch import load_file, save_file

    with safe_open(folder / LORA_FILE, "pt") as handle:
        header = handle.metadata()
    state_dict = load_file(folder / LORA_FILE)
    change(state_dict)
    save_file(state_dict, folder / LORA_FILE, metadata=header)


def new_label_set_adapter(folder):
    transformer = random_adapter()
    replace_class_table(transformer, 3, generator=torch.Generator().manual_seed(0))
    save_pmf_lora(transformer, folder, adapter_name="b", id2label={0: "red", 1: "green", 2: "blue"})
    return transformer


def assert_nothing_loaded(pipe):
    assert not getattr(pipe.transformer, "peft_config", None)
    assert pipe.num_classes == 4 and pipe.id2label == BASE_NAMES


def test_class_table_without_its_sidecar_is_refused(tmp_path):
    new_label_set_adapter(tmp_path / "shapes")
    (tmp_path / "shapes" / ADAPTER_CONFIG_NAME).unlink()
    pipe = make_pipe()
    with pytest.raises(ValueError, match=f"has {CLASS_EMBEDDINGS_NAME} .* but no {ADAPTER_CONFIG_NAME}"):
        pipe.load_lora_weights(tmp_path / "shapes")
    assert_nothing_loaded(pipe)


def test_malformed_sidecar_names_the_file(tmp_path):
    folder = tmp_path / "adapter"
    save_pmf_lora(random_adapter(), folder, adapter_name="b")
    sidecar = folder / ADAPTER_CONFIG_NAME
    good = json.loads(sidecar.read_text())
    for text, message in [
        ('{"format": "pmf-lora", ', "is not valid JSON"),
        ("[1, 2]", "is not a pmf-diffusers adapter config"),
        (json.dumps({**good, "base_model": 5}), "`base_model` must be an object"),
    ]:
        sidecar.write_text(text)
        pipe = make_pipe()
        with pytest.raises(ValueError, match=f"{ADAPTER_CONFIG_NAME}.*{message}|{message}.*{ADAPTER_CONFIG_NAME}"):
            pipe.load_lora_weights(folder)
        assert_nothing_loaded(pipe)


def test_non_finite_weights_are_refused(tmp_path):
    folder = tmp_path / "nan"
    save_pmf_lora(random_adapter(), folder, adapter_name="b")
    key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    rewrite_lora_file(folder, lambda state_dict: state_dict[key].view(-1)[0].fill_(float("nan")))
    pipe = make_pipe()
    with pytest.raises(ValueError, match=rf"{LORA_FILE}' has NaN or infinite values in 1 tensor\(s\), e.g. {key}"):
        pipe.load_lora_weights(folder)
    assert_nothing_loaded(pipe)

    new_label_set_adapter(tmp_path / "shapes")
    table_file = tmp_path / "shapes" / CLASS_EMBEDDINGS_NAME
    from safetensors.torch import load_file, save_file

    table = load_file(table_file)
    table["class_embedder.weight"][1, 0] = float("inf")
    save_file(table, table_file)
    with pytest.raises(ValueError, match=f"class table .*{CLASS_EMBEDDINGS_NAME} has NaN or infinite values"):
        pipe.load_lora_weights(tmp_path / "shapes")
    assert_nothing_loaded(pipe)


def test_pickle_lora_files_are_refused_unread(tmp_path):
    from safetensors.torch import load_file

    folder, marker = tmp_path / "adapter", tmp_path / "payload-ran"
    save_pmf_lora(random_adapter(), folder, adapter_name="b")
    pickle_file = folder / "pytorch_lora_weights.bin"
    save_pickle_with_code(pickle_file, load_file(folder / LORA_FILE), marker)
    (folder / LORA_FILE).unlink()
    pipe = make_pipe()
    for source, kwargs in [
        (folder, {}),  # diffusers would fall back to the .bin
        (folder, {"weight_name": pickle_file.name}),
        (folder, {"use_safetensors": False}),
        (pickle_file, {}),
    ]:
        for load in (pipe.load_lora_weights, PMFPipeline.lora_state_dict):
            with pytest.raises(ValueError) as raised:
                load(source, **kwargs)
            message = str(raised.value)
            assert "\n" not in message
            assert message.startswith(f"{pickle_file} is a pickle weights file: the pMF LoRA loader loads weights only "
                                      "from safetensors")
            assert f"save_file(torch.load('{pickle_file}', weights_only=True), '{folder / LORA_FILE}')" in message
        assert_nothing_loaded(pipe)
    assert not marker.exists()
    assert_payload_is_live(pickle_file, marker)


def test_adapter_from_a_shallower_base_is_refused(tmp_path):
    folder = tmp_path / "shallow"
    save_pmf_lora(random_adapter(), folder, adapter_name="b")  # TINY: one trunk block
    deeper = make_pipe(num_layers=2)
    with pytest.raises(ValueError, match="num_layers = 1 .* vs 2"):  # the sidecar records the base shape
        deeper.load_lora_weights(folder)
    # Without the sidecar, peft would put LoRA layers on block 1 too and leave them untrained, with only a warning.
    (folder / ADAPTER_CONFIG_NAME).unlink()
    with pytest.raises(
        ValueError,
        match=r"no weights for 7 layer\(s\) its config targets .*transformer_blocks.1.attn.to_q.*"
        r"transformer_blocks: 1 in the adapter, 2 in this model",
    ):
        deeper.load_lora_weights(folder)
    assert not getattr(deeper.transformer, "peft_config", None)


def test_adapter_without_v_head_loads_into_a_model_with_one(tmp_path):
    """v-head layers are exempt from the coverage check: `include_v_head=False` drops them on purpose."""
    transformer = random_adapter()
    save_pmf_lora(transformer, tmp_path / "u_only", adapter_name="b", include_v_head=False)
    pipe = make_pipe()
    pipe.load_lora_weights(tmp_path / "u_only")
    assert torch.equal(sample(pipe), sample(make_pipe(transformer)))


# The official pMF network's names for the block linears (see `pmf_diffusers.conversion`).
OFFICIAL_BLOCK_GROUPS = {"transformer_blocks": "shared_blocks", "u_head_blocks": "u_heads", "v_head_blocks": "v_heads"}
OFFICIAL_LAYERS = {
    "attn.to_q": "attn.q_proj._flax_linear", "attn.to_k": "attn.k_proj._flax_linear",
    "attn.to_v": "attn.v_proj._flax_linear", "attn.to_out": "attn.out_proj._flax_linear",
    "ff.gate_proj": "mlp.w1._flax_linear", "ff.up_proj": "mlp.w3._flax_linear", "ff.down_proj": "mlp.w2._flax_linear",
}


def non_diffusers_keys(state_dict, naming, alpha):
    """A diffusers LoRA state dict in another trainer's layout (lora_down / lora_up / alpha)."""
    converted = {}
    for key, value in state_dict.items():
        module = key.removeprefix("transformer.").split(".lora_")[0]
        if naming == "kohya":
            stem = "lora_unet_" + module.replace(".", "_")
        elif naming == "dotted":
            stem = "transformer." + module
        else:
            group, index, layer = module.split(".", 2)
            stem = f"net.{OFFICIAL_BLOCK_GROUPS[group]}.{index}.{OFFICIAL_LAYERS[layer]}"
        converted[f"{stem}.{'lora_down' if '.lora_A.' in key else 'lora_up'}.weight"] = value
        converted[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return converted


@pytest.mark.parametrize("naming", ["kohya", "dotted", "official"])
def test_kohya_style_keys_are_converted(tmp_path, naming):
    from safetensors.torch import load_file, save_file

    transformer = make_transformer()
    add_pmf_lora(transformer, rank=2, alpha=8, adapter_name="b")  # scale alpha / rank = 4
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    save_pmf_lora(transformer, tmp_path / "diffusers", adapter_name="b")
    expected = sample(make_pipe(transformer))

    folder = tmp_path / naming
    folder.mkdir()
    save_file(non_diffusers_keys(load_file(tmp_path / "diffusers" / LORA_FILE), naming, alpha=8), folder / LORA_FILE)
    pipe = make_pipe()
    pipe.load_lora_weights(folder)
    assert max_rel_err(sample(pipe), expected) <= 1e-6


def test_unconvertible_lora_keys_name_the_file(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "foreign"
    folder.mkdir()
    save_file({"lora_unet_input_blocks_1_proj_in.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_input_blocks_1_proj_in.lora_up.weight": torch.zeros(32, 2)}, folder / LORA_FILE)
    pipe = make_pipe()
    with pytest.raises(ValueError, match=rf"foreign/{LORA_FILE}' has 2 key\(s\) that match no layer.*"
                                         r"lora_unet_input_blocks_1_proj_in.lora_down.weight.*kohya keys"):
        pipe.load_lora_weights(folder)
    save_file({"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": torch.zeros(2, 32)}, folder / LORA_FILE)
    with pytest.raises(ValueError, match="only one of the two LoRA factors, e.g. transformer_blocks.0.attn.to_q"):
        pipe.load_lora_weights(folder)
    save_file({}, folder / LORA_FILE)  # diffusers alone would load nothing and only log it
    with pytest.raises(ValueError, match=f"{LORA_FILE}' holds no LoRA weights"):
        pipe.load_lora_weights(folder)
    assert not getattr(pipe.transformer, "peft_config", None)


def test_adapter_names_that_diffusers_would_confuse_warn_with_the_fix(saved_adapter, caplog):
    pipe = make_pipe()
    with caplog.at_level("WARNING", logger="pmf_diffusers"):
        pipe.load_lora_weights(saved_adapter, adapter_name="style_one")
        pipe.load_lora_weights(saved_adapter, adapter_name="style_two")
        assert not [r for r in caplog.records if "occurs inside" in r.getMessage()]
        pipe.load_lora_weights(saved_adapter, adapter_name="b")  # "b" is inside "transformer_blocks"
    warnings = [r.getMessage() for r in caplog.records if "occurs inside" in r.getMessage()]
    assert len(warnings) == 1
    assert "Adapter name 'b' occurs inside the names of other adapters' weights" in warnings[0]
    assert "adapter_name='b_lora'" in warnings[0]
    # The warning is about diffusers' report only: the adapter itself loaded correctly.
    pipe.set_adapters("b")
    only_b = sample(pipe)
    pipe.set_adapters("style_one")
    assert torch.equal(only_b, sample(pipe))
