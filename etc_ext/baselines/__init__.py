"""Training-free visual-token compressors behind one interface, to compare with ETC.

`apply_baseline(model, method, num_tokens, **options)` extends a Hugging Face VLM in place (like `apply_etc`: a class
swap to a subclass, plus hooks); then `model(**inputs)` and `model.generate(**inputs)` run with `num_tokens` (K)
visual entries per image in the KV cache instead of N, and `remove_baseline(model)` gives the original model back.
Users' prompts and processor outputs stay as they are (N image placeholders per image).

The methods (N visual tokens per image on a `gh x gw` patch grid, K = num_tokens):

- "mean": adaptive average pooling (`torch.nn.functional.adaptive_avg_pool2d`) of the projected visual tokens on
  their 2-D grid to a `kh x kw` grid with `kh * kw = K` (`grid_shape`: the factorisation closest to the patch
  grid's aspect ratio, e.g. 1x1, 2x2, 4x4 on 12x12).
- "subsample": the projected tokens at the centres of the cells of a `kh x kw` partition of the grid (rows
  `floor((i + 1/2) gh / kh)`, same for columns), row-major.
- "visionzip": VisionZip (Yang et al., dvlab-research/VisionZip), in the vision tower's feature space before the
  projector, as its code does: in the CLIP layer whose output LLaVA reads (`vision_feature_layer`), the [CLS]
  query's attention over the patches (summed over heads) picks the dominant patches; the other patches are merged
  into contextual tokens: evenly spaced targets among them, every other one joins the target whose head-averaged
  key is most similar (cosine), and a contextual token is its target plus the mean of its group (VisionZip's
  `target_hidden + aggregated_hidden`). The query/key states are taken by forward hooks on that layer's `q_proj` and
  `k_proj` and reduced with `etc_ext.ops.cross_attn_scores`: the tower keeps its attention implementation (SDPA),
  no `output_attentions`. Like VisionZip, the [CLS] feature is one of the dominant tokens (`keep_cls=True`), and
  `[cls, dominant patches in grid order, contextual tokens]` is the order. Split (`visionzip_split`): VisionZip's
  README uses 54 + 10 tokens at 64 (and 108 + 20, 162 + 30 at 128, 192): contextual = round(5 K / 32), the rest
  dominant: K=1 -> 1 + 0 (the [CLS] token alone), 4 -> 3 + 1, 16 -> 13 + 3, 64 -> 54 + 10. `dominant=` overrides.
- "fastv": FastV (Chen et al., pkunlp-icler/FastV): the first `layer` (L, FastV's K, default 2) decoder layers run on
  the whole prompt; the attention of the L-th layer (index L - 1) ranks each image's visual tokens: queries the
  prompt's last token (`query="last"`, FastV's choice) or the text after the image (`query="instruction"`),
  probabilities over the whole causal context averaged over heads, exactly what eager attention would return, but
  from that layer's query/key states recorded by the `"etc_capture"` attention function and
  `etc_ext.ops.cross_attn_scores` (SDPA kept). The top K visual tokens stay; layers L.. run on the pruned sequence
  (forward pre-hooks on those decoder layers drop the other rows of the hidden states, rotary embeddings and mask),
  and the pruned tokens leave the cache of every layer (`cache.compact_dynamic_cache`, i.e. `write_compressed_kv` with
  `index`), so decoding sees K visual entries per image in all layers. Tokens keep their positions (a gap where
  pruned tokens were), as in FastV. With L equal to the number of layers only the cache is pruned.
- "instruction_merge": ETC's instruction-aware weighting without training: a first pass over the prompt, stopped
  after the attention of the L-th layer (default 2), gives each visual token's importance, the text-to-image
  `cross_attn_scores` of the text after the image (the instruction; with `labels`, the answer tokens are left out)
  averaged over heads and queries; the N projected tokens are split into K groups (`grouping="spatial"`: the
  `kh x kw` cells of the grid; `"similarity"`: the K most important tokens are centres and every other token joins
  the centre whose pre-RoPE key at that layer is most similar) and each group becomes one token,
  `weighted_aggregate(x, group logits, importance)`: the importance-weighted mean of the group.

"fastv" and "instruction_merge" take their queries from the prompt: with `labels` (teacher forcing), answer tokens
are never queries. Their selection depends on the prompt, so decoding keeps the prefill's choice (a forward() over
prompt + generated tokens would choose again); the other three ignore the text.

Positions: "mean", "subsample", "visionzip" and "instruction_merge" feed the language model a shorter prompt, each
image's N placeholders replaced by its K tokens, with positions as if the image had K tokens (the tokens after it
move up by N - K), as these methods do in their papers (on LLaVA; Qwen3-VL below); "fastv" keeps every position.
Decoding maps generate()'s user-layout attention mask and positions onto the cache (`compress.ETCCacheState`).

Outputs: logits are in the user's layout `(batch_size, sequence_length, vocab_size)` (`logits_to_keep` applies), so
`labels` are the user's: a text token's logits are its own; within an image, the K entries are spread over the N
positions (entry k gives the logits from position `start + ceil((k + 1) N / K) - 1` on, so the image's last position
has its last entry's, which predicts the text after the image), and a position before the image's first entry has
the logits of the entry before it (fastv: a pruned token has the logits of the kept token before it; padding is not
meaningful). At K = N every method except "visionzip" (which adds the [CLS] feature and puts merged tokens last;
with `dominant=N, keep_cls=False` it too) reproduces the unpatched model's logits at every real position. A
forward() without a cache and without `use_cache=True` returns no cache. The prefill's cache is an `ETCCache` (rows
right-aligned; masked padding in front of shorter rows) whose state says which entries are real and which are
visual: `cache_visual_entries(cache)`.

On Qwen3-VL (`qwen3_vl`): each image or video temporal group is compressed on its own grid (after encoding:
`BaselineMethod.reduce_image`), a kept entry takes the M-RoPE positions of the visual token it stands for (so the
text keeps its positions), DeepStack's features follow their tokens (merged, selected and pruned with them), and
"visionzip", without a [CLS] token there, keeps the tokens the last vision layer's queries attend to most.

Layout of the package: one module per method (`mean`, `subsample`, `visionzip`, `fastv`, `instruction_merge`), each a
`BaselineMethod` registered by name with its options (`registry`; a new method is one module: the package imports
every module it holds);
`config` (the options, checked), `grid` and `merging` (shared tensor helpers), `sequence` (the compressed sequence
and the prefill cache's state), `model` (`BaselineMixin`: the forward's dispatch and passes, written once), the
adapters `llava` (`BaselineLlavaForConditionalGeneration`) and `qwen3_vl` (`BaselineQwen3VLForConditionalGeneration`),
and `api` (`apply_baseline`, `remove_baseline`). Another model family is one adapter registered with
`register_baseline_class`; the methods take tensors and the integration's hooks, not a model class.
"""

import importlib
import pkgutil

# Every module of the package is imported: a method module registers its method by being here (a new method is one
# file). METHODS lists them in `listing_order`.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module
from .api import apply_baseline, register_baseline_class, remove_baseline  # noqa: E402
from .config import BaselineConfig, VisualGeometry  # noqa: E402
from .fastv import FastVPruner  # noqa: E402
from .grid import grid_shape, spatial_groups  # noqa: E402
from .instruction_merge import first_pass_scores  # noqa: E402
from .llava import BaselineLlavaForConditionalGeneration  # noqa: E402
from .model import Baseline, BaselineMixin  # noqa: E402
from .qwen3_vl import BaselineQwen3VLForConditionalGeneration  # noqa: E402
from .mean import mean_pool  # noqa: E402
from .merging import group_logits, merge_groups, similarity_groups  # noqa: E402
from .registry import METHOD_CLASSES, BaselineMethod, listing_order, method_label, register_method  # noqa: E402
from .sequence import (  # noqa: E402
    BaselineCacheState,
    CompressedLayout,
    cache_visual_entries,
    pruned_sequence,
    query_index,
    shorten_sequence,
)
from .subsample import subsample_index  # noqa: E402
from .visionzip import visionzip_merge, visionzip_split  # noqa: E402

METHODS = listing_order(METHOD_CLASSES)
# Methods that act while the images are encoded: `get_image_features` returns K tokens per image.
VISION_METHODS = tuple(name for name, cls in METHOD_CLASSES.items() if cls.reduces_while_encoding)

__all__ = [
    "METHODS",
    "VISION_METHODS",
    "BaselineConfig",
    "BaselineMethod",
    "register_method",
    "method_label",
    "VisualGeometry",
    "Baseline",
    "BaselineCacheState",
    "CompressedLayout",
    "FastVPruner",
    "BaselineMixin",
    "BaselineLlavaForConditionalGeneration",
    "BaselineQwen3VLForConditionalGeneration",
    "apply_baseline",
    "remove_baseline",
    "register_baseline_class",
    "cache_visual_entries",
    "grid_shape",
    "mean_pool",
    "subsample_index",
    "spatial_groups",
    "similarity_groups",
    "group_logits",
    "merge_groups",
    "visionzip_split",
    "visionzip_merge",
    "query_index",
    "shorten_sequence",
    "pruned_sequence",
    "first_pass_scores",
]
