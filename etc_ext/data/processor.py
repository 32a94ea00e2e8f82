"""A small, real Hugging Face processor for the tiny demo LLaVA model, built locally without any download.

`build_processor` returns a `transformers.LlavaProcessor` made of:

- a byte-level BPE tokenizer (`tokenizers`), trained in well under a second on the vocabulary of the shapes data
  (`etc_ext.data.shapes.shapes_vocabulary`), a list of common English words and the caller's `extra_words`, wrapped as
  `PreTrainedTokenizerFast`. Choice: byte-level BPE rather than a word-level vocabulary with `<unk>`, because it
  encodes *any* text losslessly (unknown words fall back to smaller pieces, down to single bytes, and decode back to
  the same string), while every word of the shapes data is a single token (`" red"`, `" circle"`, `" yes"`; a cell
  name such as `" b3"` is two, `" b"` and `"3"`, because the byte-level pre-tokenizer splits letters from digits).
  `<unk>` exists for compatibility but byte-level BPE never emits it.
- special tokens `<unk>`, `<s>` (BOS, added at the start of every encoded text), `</s>` (EOS, ends every assistant
  turn), `<pad>` and `<image>` (the image placeholder, `tokenizer.image_token`).
- the LLaVA-1.5 chat template: `"USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: ..."`, the generation
  prompt being `"ASSISTANT:"`. Message contents may be strings or lists of `{"type": "image"}` /
  `{"type": "text", "text": ...}` blocks; an image block renders as `"<image>\\n"`. Assistant turns are wrapped in
  `{% generation %}` so that `return_assistant_tokens_mask=True` works too.
- a `CLIPImageProcessor` resizing and center-cropping to `image_size`, with the OpenAI CLIP mean and std.

The processor expands each `<image>` into `num_image_tokens(processor)` copies: `(image_size // patch_size) ** 2`
with LLaVA-1.5's convention (a CLIP tower with a CLS token, `num_additional_image_tokens=1`, and
`vision_feature_select_strategy="default"` dropping the CLS). The demo's 168 px and patch 14 give 144 tokens. The tiny
model must be configured to match: `CLIPVisionConfig(image_size=168, patch_size=14)`,
`LlavaConfig(vision_feature_select_strategy="default", image_token_id=tokenizer.image_token_id)` and a vocabulary of
`len(tokenizer)` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from .shapes import DEFAULT_IMAGE_SIZE, shapes_vocabulary


IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
DEFAULT_PATCH_SIZE = 14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LLaVA-1.5 (vicuna_v1) conversation format. A system message, if any, is written first followed by a space.
LLAVA_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for block in content -%}"
    "{%- if block['type'] == 'image' -%}{{- '<image>\n' -}}"
    "{%- elif block['type'] == 'text' -%}{{- block['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- render(message['content']) + ' ' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'USER: ' + render(message['content']) + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' -}}{%- generation -%}{{- render(message['content']) + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('unknown role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Common English words (and words of VQA instructions) that get whole tokens, so that generic prompts stay short.
# Anything else still encodes, in smaller byte-level pieces.
COMMON_WORDS = """
the be to of and a in that have i it for not on with he as you do at this but his by from they we say her she or an
will my one all would there their what so up out if about who get which go me when make can like time no just him
know take people into year your good some could them see other than then now look only come its over think also back
after use two how our work first well way even new want because any these give day most us is are was were been has
had did does done said made more many much very such here where why yes answer question image picture photo shown
show shows describe description detail details color colour shape object objects left right top bottom middle center
row column cell grid number count please single word phrase using
brief briefly short long text read write letter letters small large big little red green blue yellow purple orange
black white gray grey brown pink circle square triangle cross line lines dot dots box round sharp next above below
between near far front behind inside outside first second third last each every both few several same different
person man woman child dog cat car tree house sky water table chair book phone sign food hand head face
""".split()


def _training_corpus(extra_words: Iterable[str]) -> list[str]:
    """Texts the BPE is trained on: every word in four forms (with/without a leading space, lower/capitalized), plus
    the full shapes questions and the chat-template words, so that each word ends up as one token."""
    words = set(COMMON_WORDS) | {"USER", "ASSISTANT"} | set(extra_words)
    for text in shapes_vocabulary():
        words.update(text.split())
    corpus = []
    for word in sorted(words):
        for form in {word, word.lower(), word.capitalize()}:
            corpus += [form, " " + form]
    corpus += shapes_vocabulary()
    return corpus


def build_tokenizer(extra_words: Iterable[str] = (), model_max_length: int = 2048):
    """Trains the byte-level BPE tokenizer and wraps it as `transformers.PreTrainedTokenizerFast` (deterministic:
    same words, same vocabulary). See the module docstring for the special tokens and the chat template.

    Args:
        extra_words: more words to give whole tokens (e.g. the vocabulary of another data set).
        model_max_length: longest sequence the model accepts, stored in the tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = [SPECIAL_TOKENS["unk_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]]
    special += [SPECIAL_TOKENS["pad_token"], IMAGE_TOKEN]
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,  # an upper bound: training stops once every word of the corpus is a single token
        min_frequency=1,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_corpus(extra_words), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **SPECIAL_TOKENS,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=LLAVA_CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_image_processor(image_size: int = DEFAULT_IMAGE_SIZE):
    """CLIP-style image processor: resize the shortest edge to `image_size`, center-crop to a square, rescale to
    [0, 1] and normalize with the OpenAI CLIP mean and std. Output `pixel_values`: `(num_images, 3, image_size,
    image_size)`. Uses the torchvision backend when torchvision is installed, else the PIL one."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        from transformers import CLIPImageProcessor as ImageProcessor
    else:  # same preprocessing and saved config, without the warning about the missing torchvision backend
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    return ImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def build_processor(
    image_size: int = DEFAULT_IMAGE_SIZE,
    patch_size: int = DEFAULT_PATCH_SIZE,
    extra_words: Iterable[str] = (),
    *,
    vision_feature_select_strategy: str = "default",
    num_additional_image_tokens: int = 1,
    model_max_length: int = 2048,
):
    """Builds the demo's `transformers.LlavaProcessor` (tokenizer, chat template, image processor), no download.

    Args:
        image_size: side of the (square) images the vision tower reads, in pixels.
        patch_size: patch size of the vision tower.
        extra_words: more words to give whole tokens in the tokenizer.
        vision_feature_select_strategy: `"default"` (drop the CLS feature, as LLaVA-1.5) or `"full"`; must match
            the model's config.
        num_additional_image_tokens: tokens the vision tower adds to the patches (1 for CLIP's CLS).
        model_max_length: longest sequence the model accepts.

    Returns:
        A `LlavaProcessor`; `save_pretrained(dir)` / `LlavaProcessor.from_pretrained(dir)` (or `AutoProcessor`) round
        trip it. `num_image_tokens(processor)` tells how many `<image>` tokens one image becomes.
    """
    from transformers import LlavaProcessor

    if patch_size < 1 or image_size < patch_size:
        raise ValueError(f"need 1 <= patch_size <= image_size, got patch_size={patch_size}, image_size={image_size}")
    if vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(
            f"vision_feature_select_strategy must be 'default' or 'full', got {vision_feature_select_strategy!r}"
        )
    processor = LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=build_tokenizer(extra_words, model_max_length=model_max_length),
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=num_additional_image_tokens,
    )
    if num_image_tokens(processor) < 1:
        raise ValueError(
            f"image_size={image_size}, patch_size={patch_size}, num_additional_image_tokens="
            f"{num_additional_image_tokens} and strategy {vision_feature_select_strategy!r} give no image tokens"
        )
    return processor


def num_image_tokens(processor) -> int:
    """Number of image tokens a `LlavaProcessor` puts in place of one `<image>` (for its crop size):
    `(height // patch) * (width // patch) + num_additional_image_tokens`, minus one for the `"default"` strategy."""
    crop = processor.image_processor.crop_size
    count = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    count += processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        count -= 1
    return count
