"""Key layouts of LoRA files: how each tool spells a module and its tensors.

Reading: :func:`parse_key` splits a file key into (module spelling, role) and :func:`module_from_key`
turns the module spelling into this package's canonical name (``unet.<diffusers path>``,
``text_encoder.text_model.<path>``). Layouts read:

* ``peft``: diffusers / peft, ``unet.<path>.lora_A.weight`` / ``.lora_B.weight``, also with an
  adapter name (``.lora_A.default.weight``), ``base_model.model.`` or no component prefix at all
  (as ``peft.get_peft_model_state_dict(unet)`` returns it; the caller names the component);
* ``diffusers-attn-procs``: the old diffusers spelling ``<path>.processor.to_q_lora.down.weight``;
* ``kohya``: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_`` for text encoders, LoCon conv layers
  included; for the DiT families ``lora_transformer_<diffusers path with _>`` (OneTrainer's,
  ComfyUI maps it for SD 3 and Flux), and kohya's Flux files with the original BFL names
  (``lora_unet_double_blocks_N_img_attn_qkv``; ComfyUI's ``diffusion_model.double_blocks.N...`` too),
  split into diffusers' modules by ``lora.dit`` before these names are read;
* ``kohya-ldm``: kohya with the original (LDM / sgm) UNet names, ``lora_unet_input_blocks_4_1_...``,
  as kohya's SDXL scripts write them (``lycoris_<path>``, SimpleTuner's spelling, reads as kohya);
* ``comfyui``: what ComfyUI's own LoRA training and extraction save: ``diffusion_model.<LDM path>``
  and ``text_encoders.clip_l.transformer.<path>`` with ``lora_up`` / ``lora_down`` / ``alpha``;
* ``ai-toolkit``: ``diffusion_model.<diffusers path>.lora_A.weight`` / ``.lora_B.weight`` for the DiT
  families (Qwen-Image, Z-Image), as ai-toolkit writes them; FLUX.2's, in BFL's names with fused
  q/k/v, are first split into diffusers' modules by ``lora.dit``;
* musubi-tuner's ``lora_unet_<diffusers path with _>`` for the DiT families reads as ``kohya``.

LyCORIS LoHa / LoKr / OFT, DoRA, Tucker-decomposed LoCon and peft's LoRA biases have no low-rank
form here: they are refused by name (:data:`REFUSED_FORMATS`). Names only: no tensor is touched.
"""

from __future__ import annotations

import functools
import re

from selma_toolkit.architectures import COMFY_CLIP_COMPONENTS, COMPONENTS, KOHYA_TEXT_PREFIXES, Family
from selma_toolkit.errors import LoraFormatError, Remedy
from selma_toolkit.lora.core import canonical_module_name

# (suffix, role), longest suffixes first. Roles: down (A), up (B), alpha, and full-weight
# differences (diff: a dense update of a weight; bias_diff: of a bias or a norm weight).
_SUFFIX_ROLES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", "down"),  # old diffusers text-encoder spelling
    (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"),  # kohya, ComfyUI
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),  # diffusers LoRACompatibleLinear
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),  # old diffusers attention processors: ...processor.to_q_lora.down.weight
    ("_lora.up.weight", "up"),
    (".lora_A.weight", "down"),  # peft
    (".lora_B.weight", "up"),
    (".lora_A", "down"),  # peft names without .weight (Mochi-style files ComfyUI also reads)
    (".lora_B", "up"),
    (".alpha", "alpha"),
    (".diff", "diff"),  # ComfyUI / LyCORIS "full": a dense weight difference
    (".diff_b", "bias_diff"),
    (".w_norm", "bias_diff"),
    (".b_norm", "bias_diff"),
)
_PEFT_NAMED = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[A-Za-z0-9_\-]+)\.weight$")

# Key patterns of adapter types that have no (A, B, alpha) form, and what to call them.
REFUSED_FORMATS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.hada_(w1_a|w1_b|w2_a|w2_b|t1|t2)$"), "LyCORIS LoHa (hada_* keys)"),
    (re.compile(r"\.lokr_(w1|w2|w1_a|w1_b|w2_a|w2_b|t2)$"), "LyCORIS LoKr (lokr_* keys)"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_R\.weight|boft_R|boft_s)$"), "OFT / BOFT (oft_* keys)"),
    (
        re.compile(r"\.(dora_scale|lora_magnitude_vector(\.[A-Za-z0-9_\-]+)?(\.weight)?)$"),
        "DoRA (dora_scale / lora_magnitude_vector keys)",
    ),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon with Tucker decomposition (lora_mid keys)"),
    (re.compile(r"\.lora_B(\.[A-Za-z0-9_\-]+)?\.bias$"), "peft LoRA with biases (lora_bias=True: lora_B.bias keys)"),
    (re.compile(r"\.lora_embedding_[AB](\.[A-Za-z0-9_\-]+)?$"), "peft embedding LoRA (lora_embedding_A/B keys)"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA (a1/a2/b1/b2 keys)"),
)

# Identifiers that contain "_" in SD-family module paths: kohya names replace every "." by "_",
# so decoding has to know which underscores were there to begin with.
_COMPOUND_WORDS = (
    # diffusers UNet
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "conv_shortcut",
    "time_emb_proj",
    "time_embedding",
    "linear_1",
    "linear_2",
    "add_embedding",
    "class_embedding",
    "encoder_hid_proj",
    "add_k_proj",
    "add_v_proj",
    # original (LDM / sgm) UNet
    "input_blocks",
    "output_blocks",
    "middle_block",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
    "time_embed",
    "label_emb",
    # diffusers DiT transformers (SD3Transformer2DModel, FluxTransformer2DModel, Chroma, Qwen-Image,
    # Z-Image, FLUX.2)
    "single_transformer_blocks",
    "add_q_proj",
    "to_add_out",
    "ff_context",
    "norm1_context",
    "proj_mlp",
    "x_embedder",
    "context_embedder",
    "time_text_embed",
    "timestep_embedder",
    "guidance_embedder",
    "text_embedder",
    "norm_out",
    "pos_embed",
    "distilled_guidance_layer",
    "in_proj",
    "img_in",
    "txt_in",
    "txt_norm",
    "img_mod",
    "txt_mod",
    "img_mlp",
    "txt_mlp",
    "noise_refiner",
    "context_refiner",
    "feed_forward",
    "adaLN_modulation",
    "attention_norm1",
    "attention_norm2",
    "ffn_norm1",
    "ffn_norm2",
    "all_x_embedder",
    "all_final_layer",
    "cap_embedder",
    "t_embedder",
    "to_qkv_mlp_proj",
    "linear_in",
    "linear_out",
    "time_guidance_embed",
    "double_stream_modulation_img",
    "double_stream_modulation_txt",
    "single_stream_modulation",
    # CLIP text encoders
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm1",
    "layer_norm2",
    "final_layer_norm",
    "token_embedding",
    "position_embedding",
    "text_projection",
)
_COMPOUNDS = sorted((tuple(word.split("_")) for word in _COMPOUND_WORDS), key=len, reverse=True)
# The compounds by their first token, longest first (the order of _COMPOUNDS): decoding tries only
# those that can start at a token, instead of every compound at every token.
_COMPOUNDS_BY_HEAD: dict[str, tuple[tuple[str, ...], ...]] = {
    head: tuple(compound for compound in _COMPOUNDS if compound[0] == head) for head in {c[0] for c in _COMPOUNDS}
}
# Top-level modules of diffusers' DiT transformers (none is a top-level UNet module name).
_DIT_HEADS = (
    "transformer_blocks",
    "single_transformer_blocks",
    "x_embedder",
    "context_embedder",
    "time_text_embed",
    "pos_embed",
    "norm_out",
    "proj_out",
    "distilled_guidance_layer",
    "img_in",
    "txt_in",
    "txt_norm",
    "layers",
    "noise_refiner",
    "context_refiner",
    "all_x_embedder",
    "all_final_layer",
    "cap_embedder",
    "t_embedder",
    "time_guidance_embed",
    "double_stream_modulation_img",
    "double_stream_modulation_txt",
    "single_stream_modulation",
)
_LDM_HEADS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
_RESNET_LDM_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_ADD_EMBEDDING_LDM = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# Old diffusers text-encoder attention names -> CLIP's own.
_TE_ATTN_PROCS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj", "to_out.0": "out_proj"}


@functools.lru_cache(maxsize=1 << 16)  # names only, and the experts of a merge share them
def parse_key(key: str) -> tuple[str, str] | None:
    """``key`` -> (module spelling, role) with role down / up / alpha / diff / bias_diff, or None
    when the key is no LoRA key at all. Refused formats raise :class:`LoraFormatError`."""
    for pattern, name in REFUSED_FORMATS:
        if pattern.search(key):
            raise LoraFormatError(
                f"key {key!r} belongs to a {name} adapter: its update has no (A, B, alpha) low-rank form, "
                "so selma-toolkit does not read it. Use a plain LoRA (or LoCon) file, or bake the adapter "
                "into the base model with the tool that made it"
            )
    for suffix, role in _SUFFIX_ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    match = _PEFT_NAMED.match(key)
    if match:
        return match["module"], "down" if match["ab"] == "A" else "up"
    return None


def peft_adapter_name(key: str) -> str | None:
    """The adapter name inside a peft key (``...lora_A.default.weight`` -> ``default``), else None."""
    match = _PEFT_NAMED.match(key)
    return match["adapter"] if match else None


@functools.lru_cache(maxsize=1 << 16)  # the experts of a merge share their keys
def decode_kohya_path(flat: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` -> the dotted module path.

    kohya replaces every "." by "_"; an underscore that belongs to a name is restored from the list
    of SD-family identifiers (the same idea as diffusers' string replacements, applied per token so
    that one name never eats part of the next).
    """
    tokens = flat.split("_")
    words: list[str] = []
    index = 0
    while index < len(tokens):
        for compound in _COMPOUNDS_BY_HEAD.get(tokens[index], ()):
            if tuple(tokens[index : index + len(compound)]) == compound:
                words.append("_".join(compound))
                index += len(compound)
                break
        else:
            words.append(tokens[index])
            index += 1
    return ".".join(words)


def encode_kohya_path(path: str) -> str:
    """The kohya spelling of a dotted module path ("." -> "_")."""
    return path.replace(".", "_")


def ldm_to_diffusers_unet_path(path: str, layers_per_block: int = 2) -> str:
    """An original (LDM / sgm) UNet module path -> the diffusers UNet2DConditionModel path.

    ``layers_per_block`` is the UNet's ``num_res_blocks`` (2 in SD 1.x, SD 2.x and SDXL): input
    block n >= 1 is down block (n-1) // (L+1), layer (n-1) % (L+1), the last of which is the
    downsampler; output block n is up block n // (L+1), layer n % (L+1). Raises ValueError for a
    path that is not a UNet module.
    """
    parts = path.split(".")
    step = layers_per_block + 1
    head, rest = parts[0], parts[1:]
    fixed = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
        "input_blocks.0.0": "conv_in",
    }
    if path in fixed:
        return fixed[path]
    try:
        if head == "input_blocks":
            block, layer = divmod(int(rest[0]) - 1, step)
            sub, inner = rest[1], rest[2:]
            if layer == layers_per_block:
                if sub == "0" and inner == ["op"]:
                    return f"down_blocks.{block}.downsamplers.0.conv"
                raise ValueError(path)
            return _ldm_block_part(f"down_blocks.{block}", layer, sub, inner, path)
        if head == "middle_block":
            sub, inner = rest[0], rest[1:]
            if sub == "1":
                return ".".join(["mid_block.attentions.0", *inner])
            return _ldm_resnet(f"mid_block.resnets.{0 if sub == '0' else 1}", inner, path)
        if head == "output_blocks":
            block, layer = divmod(int(rest[0]), step)
            sub, inner = rest[1], rest[2:]
            if sub in ("1", "2") and inner == ["conv"]:
                return f"up_blocks.{block}.upsamplers.0.conv"
            return _ldm_block_part(f"up_blocks.{block}", layer, sub, inner, path)
    except (IndexError, ValueError):
        pass
    raise ValueError(f"{path!r} is not a module of an SD-family UNet in the original (LDM) naming")


def _ldm_block_part(block: str, layer: int, sub: str, inner: list[str], path: str) -> str:
    if sub == "0":
        return _ldm_resnet(f"{block}.resnets.{layer}", inner, path)
    if sub == "1" and inner:
        return ".".join([f"{block}.attentions.{layer}", *inner])
    raise ValueError(path)


def _ldm_resnet(prefix: str, inner: list[str], path: str) -> str:
    name = _RESNET_LDM_TO_DIFFUSERS.get(".".join(inner))
    if name is None:
        raise ValueError(path)
    return f"{prefix}.{name}"


@functools.lru_cache(maxsize=1 << 16)  # names only, and the experts of a merge share them
def module_from_key(spelling: str, *, component: str | None = None, ldm_layers_per_block: int = 2) -> tuple[str, str]:
    """A module spelling from :func:`parse_key` -> (canonical module name, layout).

    ``component`` names the model part for peft keys without a component prefix. Raises
    :class:`LoraFormatError` when the spelling cannot be placed.
    """
    if spelling.startswith("lora_transformer_"):
        return canonical_module_name("transformer", decode_kohya_path(spelling[len("lora_transformer_") :])), "kohya"
    if spelling.startswith(("lora_unet_", "lycoris_")):
        path = decode_kohya_path(
            spelling.split("_", 2)[2] if spelling.startswith("lora_unet_") else spelling[len("lycoris_") :]
        )
        if path.split(".")[0] in _DIT_HEADS:  # SimpleTuner's DiT files (lycoris_), musubi-tuner's (lora_unet_)
            return canonical_module_name("transformer", path), "kohya"
        if path.split(".")[0] in _LDM_HEADS:
            return canonical_module_name("unet", _ldm_path(path, spelling, ldm_layers_per_block)), "kohya-ldm"
        return canonical_module_name("unet", path), "kohya"
    for prefix, te_component in KOHYA_TEXT_PREFIXES:
        if spelling.startswith(prefix):
            return canonical_module_name(te_component, decode_kohya_path(spelling[len(prefix) :])), "kohya"
    if spelling.startswith("diffusion_model."):
        path = spelling[len("diffusion_model.") :]
        if path.split(".")[0] in _DIT_HEADS:  # ai-toolkit's DiT files: diffusers' module paths
            return canonical_module_name("transformer", path), "ai-toolkit"
        return canonical_module_name("unet", _ldm_path(path, spelling, ldm_layers_per_block)), "comfyui"
    if spelling.startswith("text_encoders."):
        clip, _, rest = spelling[len("text_encoders.") :].partition(".")
        if clip not in COMFY_CLIP_COMPONENTS or not rest.startswith("transformer."):
            raise LoraFormatError(
                f"key {spelling!r}: ComfyUI text-encoder key for {clip!r}; expected "
                f"{', '.join(COMFY_CLIP_COMPONENTS)} followed by .transformer."
            )
        return canonical_module_name(COMFY_CLIP_COMPONENTS[clip], rest[len("transformer.") :]), "comfyui"

    head, _, rest = spelling.partition(".")
    if head in COMPONENTS and rest:
        found_component, path = head, rest
    elif component is not None:
        found_component, path = component, spelling
    elif ".processor." in spelling:
        found_component, path = "unet", spelling  # attention processors only ever existed in the UNet
    else:
        raise LoraFormatError(
            what="has no component prefix (unet. / transformer. / text_encoder. / text_encoder_2.), as "
            "peft.get_peft_model_state_dict(model) returns keys",
            where=f"key {spelling!r}",
            remedies=[Remedy.set("component", "unet", note="the model part its keys are for")],
        )
    path = path.removeprefix("base_model.model.")
    layout = "peft"
    if ".processor." in path:
        layout = "diffusers-attn-procs"
        path = path.replace(".processor.", ".")
        if path.endswith(".to_out"):
            path += ".0"
    if found_component.startswith("text_encoder"):
        module, _, last = path.rpartition(".")
        if path.endswith("to_out.0"):
            module, last = path[: -len(".to_out.0")], "to_out.0"
        if module.endswith("self_attn") and last in _TE_ATTN_PROCS:
            path = f"{module}.{_TE_ATTN_PROCS[last]}"
    try:
        return canonical_module_name(found_component, path), layout
    except ValueError as exc:
        raise LoraFormatError(f"key {spelling!r}: {exc}") from None


def _ldm_path(path: str, spelling: str, layers_per_block: int) -> str:
    try:
        return ldm_to_diffusers_unet_path(path, layers_per_block)
    except ValueError:
        raise LoraFormatError(
            f"key {spelling!r}: {path!r} is not a module of an SD 1.x / 2.x / SDXL UNet in the original "
            f"(LDM) naming with {layers_per_block} layers per block"
        ) from None


def kohya_module_name(canonical: str, *, family: Family) -> str:
    """Canonical name -> kohya name: ``lora_unet_<path>``, and for text encoders the family's
    prefix (``lora_te_`` for SD 1.x / 2.x, ``lora_te1_`` / ``lora_te2_`` for SDXL). Text-encoder
    paths keep ``text_model``, as ComfyUI's key map expects
    (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``)."""
    component, _, path = canonical.partition(".")
    if component == "transformer":  # OneTrainer's spelling of diffusers' DiT paths, which ComfyUI maps
        return "lora_transformer_" + encode_kohya_path(path)
    if component == "unet":
        prefix = "lora_unet_"
        # diffusers' kohya reader mangles add_embedding_linear_N (its "emb" heuristic drops the
        # index) but maps the original name label_emb_0_N; ComfyUI accepts both spellings.
        path = _ADD_EMBEDDING_LDM.get(path, path)
    else:
        prefix = family.text_encoder(component).kohya_prefix
    return prefix + encode_kohya_path(path)


def peft_module_path(canonical: str) -> str:
    """Canonical name -> the module path peft matches against the model: component prefix and
    ``text_model.`` dropped, so the path is a suffix of the real one under transformers 4
    (``text_model.encoder...``) and 5 (``encoder...``) alike."""
    _, _, path = canonical.partition(".")
    return path.removeprefix("text_model.")
