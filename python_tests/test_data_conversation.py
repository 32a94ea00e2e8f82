"""Tests of the demo processor, LLaVA conversation loading, labels and batching (etc_ext.data)."""

import copy
import json
import logging
import os

import pytest
import torch
from PIL import Image

from etc_ext.data import (
    IGNORE_INDEX,
    BadSampleError,
    ConversationCollator,
    ConversationDataset,
    build_processor,
    build_tokenizer,
    generate_shapes_dataset,
    num_image_tokens,
)


# The chat template of llava-hf/llava-1.5-7b-hf: images first, no EOS after answers, a space after every text.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# A ChatML (Qwen-style) template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(out, 6, seed=0, split="train", progress=False)
    generate_shapes_dataset(out, 4, seed=0, split="val", questions_per_image=3, multi_turn=True, progress=False)
    return out


def _label_runs(labels):
    """Contiguous runs of learned positions, as lists of token ids."""
    runs, current = [], []
    for token in labels.tolist():
        if token != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _gpt_answers(sample):
    return [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]


def _image(color):
    return Image.new("RGB", (200, 160), color)


def test_tokenizer_special_tokens_and_english(processor):
    tokenizer = processor.tokenizer
    assert tokenizer.image_token == "<image>"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>")}
    assert len(set(ids.values())) == 5
    assert tokenizer.bos_token_id == ids["<s>"] and tokenizer.eos_token_id == ids["</s>"]
    assert tokenizer.pad_token_id == ids["<pad>"]
    assert tokenizer("<image>", add_special_tokens=False).input_ids == [ids["<image>"]]
    # Shapes vocabulary: one token per word.
    for word in (" red", " circle", " triangles", " yes", " four", " column", "What", " ASSISTANT"):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    # Any English (or other) text round-trips exactly, never through <unk>, and common words stay short.
    text = "The quick brown fox jumps over the lazy dog. Naïve café, 3.14 € — 😀 and supercalifragilistic!"
    encoded = tokenizer(text).input_ids
    assert encoded[0] == tokenizer.bos_token_id
    assert ids["<unk>"] not in encoded
    assert tokenizer.decode(encoded, skip_special_tokens=True) == text
    assert len(tokenizer("describe the image in detail", add_special_tokens=False).input_ids) == 5


def test_tokenizer_is_deterministic():
    a, b = build_tokenizer(), build_tokenizer(extra_words=["zebra"])
    assert a.get_vocab() == build_tokenizer().get_vocab()
    assert len(b) > len(a) and len(b(" zebra", add_special_tokens=False).input_ids) == 1
    assert len(a(" zebra", add_special_tokens=False).input_ids) > 1


@pytest.mark.parametrize(
    "image_size, patch_size, strategy, expected",
    [(168, 14, "default", 144), (192, 16, "default", 144), (224, 14, "default", 256), (168, 14, "full", 145)],
)
def test_processor_expands_image_tokens(image_size, patch_size, strategy, expected):
    processor = build_processor(image_size, patch_size, vision_feature_select_strategy=strategy)
    assert num_image_tokens(processor) == expected
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "USER: <image>\nWhat color? ASSISTANT:"
    texts = [text, "USER: <image>\n<image>\nTwo? ASSISTANT:"]
    out = processor(text=texts, images=[[_image("red")], [_image("blue")] * 2], return_tensors="pt", padding=True)
    image_token_id = processor.tokenizer.image_token_id
    assert (out["input_ids"] == image_token_id).sum(dim=1).tolist() == [expected, 2 * expected]
    assert out["pixel_values"].shape == (3, 3, image_size, image_size)


def test_processor_save_and_load(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlavaProcessor"
    assert num_image_tokens(loaded) == num_image_tokens(processor) == 144
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a red circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ]
    text = processor.apply_chat_template(messages)
    assert loaded.apply_chat_template(messages) == text == "USER: <image>\nIs there a red circle? ASSISTANT: yes</s>"
    a = processor(text=[text], images=[_image("red")], return_tensors="pt")
    b = loaded(text=[text], images=[_image("red")], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.allclose(a["pixel_values"], b["pixel_values"])


def test_labels_only_on_assistant_turns(processor, shapes_dir):
    dataset = ConversationDataset(os.path.join(shapes_dir, "train.json"), processor)
    samples = json.load(open(os.path.join(shapes_dir, "train.json")))
    assert len(dataset) == len(samples) == 12
    tokenizer = processor.tokenizer
    for index, sample in enumerate(samples):
        item = dataset[index]
        assert item["id"] == sample["id"] and item["num_images"] == 1
        assert item["pixel_values"].shape == (1, 3, 168, 168)
        input_ids, labels = item["input_ids"], item["labels"]
        learned = labels != IGNORE_INDEX
        assert torch.equal(labels[learned], input_ids[learned])
        assert (input_ids == tokenizer.image_token_id).sum() == 144
        assert not learned[input_ids == tokenizer.image_token_id].any()
        runs = _label_runs(labels)
        assert [tokenizer.decode(run) for run in runs] == [f" {answer}</s>" for answer in _gpt_answers(sample)]
        # The learned tokens end the sequence: everything before them is the prompt.
        text = tokenizer.decode(input_ids[~learned & (input_ids != tokenizer.image_token_id)])
        assert text == "<s>USER: \n" + sample["conversations"][0]["value"].removeprefix("<image>\n") + " ASSISTANT:"


def test_multi_turn_labels(processor, shapes_dir):
    dataset = ConversationDataset(os.path.join(shapes_dir, "val.json"), processor)
    samples = json.load(open(os.path.join(shapes_dir, "val.json")))
    tokenizer = processor.tokenizer
    for index, sample in enumerate(samples):
        item = dataset[index]
        answers = _gpt_answers(sample)
        assert len(answers) == 3
        assert [tokenizer.decode(run) for run in _label_runs(item["labels"])] == [f" {a}</s>" for a in answers]
        assert (item["input_ids"] == tokenizer.image_token_id).sum() == 144  # one image, in the first turn
        # Text-level check of the whole sequence: LLaVA-1.5's multi-turn format.
        questions = [t["value"].removeprefix("<image>\n") for t in sample["conversations"][::2]]
        expected = "<s>" + "".join(f"USER: {'' if k else chr(10)}{q} ASSISTANT: {a}</s>"
                                   for k, (q, a) in enumerate(zip(questions, answers)))  # fmt: skip
        assert tokenizer.decode(item["input_ids"][item["input_ids"] != tokenizer.image_token_id]) == expected


@pytest.mark.parametrize(
    "template, learned_text",
    [(LLAVA_HF_TEMPLATE, " {}"), (CHATML_TEMPLATE, "{}<|im_end|>")],
    ids=["llava-hf", "chatml"],
)
def test_labels_with_other_chat_templates(template, learned_text, shapes_dir):
    processor = build_processor()
    processor.chat_template = template
    samples = json.load(open(os.path.join(shapes_dir, "val.json")))
    dataset = ConversationDataset(samples, processor, image_root=shapes_dir)
    item = dataset[0]
    decoded = [processor.tokenizer.decode(run) for run in _label_runs(item["labels"])]
    assert decoded == [learned_text.format(a) for a in _gpt_answers(samples[0])]
    assert (item["input_ids"] == processor.tokenizer.image_token_id).sum() == 144


def test_non_incremental_chat_template_raises(processor):
    processor = copy.deepcopy(processor)
    processor.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'][0]['text'] }}\n{% endfor %}"
    )
    data = [{"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    with pytest.raises(ValueError, match="incrementally"):
        ConversationDataset(data, processor)[0]


def test_prompt_items_for_evaluation(processor, shapes_dir):
    dataset = ConversationDataset(os.path.join(shapes_dir, "val.json"), processor, mode="eval")
    samples = json.load(open(os.path.join(shapes_dir, "val.json")))
    tokenizer = processor.tokenizer
    item = dataset[0]
    answers = _gpt_answers(samples[0])
    assert set(item) >= {"id", "answer", "input_ids", "attention_mask", "pixel_values", "num_images"}
    assert "labels" not in item
    assert item["answer"] == answers[-1]
    assert item["meta"] == {"question_types": samples[0]["question_types"]}
    assert item["pixel_values"].shape == (1, 3, 168, 168)
    text = tokenizer.decode(item["input_ids"][item["input_ids"] != tokenizer.image_token_id])
    last_question = samples[0]["conversations"][-2]["value"]
    assert text.endswith(f"USER: {last_question} ASSISTANT:")
    assert f"ASSISTANT: {answers[0]}</s>" in text and f"ASSISTANT: {answers[1]}</s>" in text  # earlier turns kept
    assert not text.endswith(answers[-1])


def _mixed_samples(root):
    generate_shapes_dataset(root, 2, seed=4, split="test", progress=False)
    return [
        {"id": "text", "conversations": [{"from": "human", "value": "Say hello to the world, please."},
                                         {"from": "gpt", "value": "Hello world."}]},
        {"id": "one", "image": "images/test/000000.png",
         "conversations": [{"from": "human", "value": "What shape is in row 1, column a?\n<image>"},
                           {"from": "gpt", "value": "circle"}]},
        {"id": "two", "image": ["images/test/000001.png", "images/test/000000.png"], "source": "mixed",
         "conversations": [{"from": "human", "value": "<image>\nCompare with <image> please."},
                           {"from": "gpt", "value": "same"}, {"from": "human", "value": "Sure?"},
                           {"from": "gpt", "value": "yes"}]},
    ]  # fmt: skip


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_padding_and_mixed_images(processor, tmp_path, padding_side):
    dataset = ConversationDataset(_mixed_samples(tmp_path), processor, image_root=tmp_path)
    items = [dataset[i] for i in range(3)]
    collate = ConversationCollator.from_processor(processor, padding_side=padding_side, pad_to_multiple_of=8)
    batch = collate(items)
    lengths = [item["input_ids"].shape[0] for item in items]
    length = batch["input_ids"].shape[1]
    assert length % 8 == 0 and length >= max(lengths) and length < max(lengths) + 8
    assert batch["ids"] == ["text", "one", "two"]
    assert batch["num_images"].tolist() == [0, 1, 2]
    assert batch["pixel_values"].shape == (3, 3, 168, 168)
    # Images in batch order: item "one" then item "two" (its two images in placeholder order).
    expected = torch.cat([items[1]["pixel_values"], items[2]["pixel_values"]])
    assert torch.equal(batch["pixel_values"], expected)
    assert not torch.equal(expected[1], expected[2]) and torch.equal(expected[0], expected[2])
    pad = processor.tokenizer.pad_token_id
    for b, (item, n) in enumerate(zip(items, lengths)):
        real = slice(0, n) if padding_side == "right" else slice(length - n, length)
        padded = slice(n, length) if padding_side == "right" else slice(0, length - n)
        assert torch.equal(batch["input_ids"][b, real], item["input_ids"])
        assert torch.equal(batch["labels"][b, real], item["labels"])
        assert batch["attention_mask"][b, real].eq(1).all() and batch["attention_mask"][b, padded].eq(0).all()
        assert batch["input_ids"][b, padded].eq(pad).all() and batch["labels"][b, padded].eq(IGNORE_INDEX).all()
    tokenizer = processor.tokenizer
    assert [tokenizer.decode(r) for r in _label_runs(batch["labels"][0])] == [" Hello world.</s>"]
    assert [tokenizer.decode(r) for r in _label_runs(batch["labels"][2])] == [" same</s>", " yes</s>"]
    assert (batch["input_ids"] == tokenizer.image_token_id).sum(dim=1).tolist() == [0, 144, 288]


def test_collator_text_only_and_eval_batches(processor, tmp_path):
    samples = _mixed_samples(tmp_path)
    train = ConversationDataset(samples[:1], processor, image_root=tmp_path)
    batch = ConversationCollator.from_processor(processor)([train[0], train[0]])
    assert batch["pixel_values"] is None and batch["num_images"].tolist() == [0, 0]
    evaluation = ConversationDataset(samples, processor, image_root=tmp_path, mode="eval")
    batch = ConversationCollator.from_processor(processor, padding_side="left")([evaluation[i] for i in range(3)])
    assert "labels" not in batch
    assert batch["answers"] == ["Hello world.", "circle", "yes"]
    assert batch["meta"] == [{}, {}, {"source": "mixed"}]
    assert batch["num_images"].tolist() == [0, 1, 2] and batch["pixel_values"].shape[0] == 3
    # Left padding: every prompt ends with the generation prompt in the last column.
    assert batch["attention_mask"][:, -1].eq(1).all()
    for row in batch["input_ids"]:
        assert processor.tokenizer.decode(row[-3:]).endswith("ASSISTANT:")
    with pytest.raises(ValueError, match="mix"):
        ConversationCollator.from_processor(processor)([train[0], evaluation[0]])


def test_collator_pads_per_token_type_ids():
    # Qwen-VL processors also return mm_token_type_ids (1 at image tokens): padded like the mask, not concatenated.
    items = [
        {"id": "a", "input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
         "mm_token_type_ids": torch.tensor([0, 1, 0]), "num_images": 1, "pixel_values": torch.zeros(4, 6)},
        {"id": "b", "input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long),
         "mm_token_type_ids": torch.tensor([0]), "num_images": 0, "pixel_values": None},
    ]  # fmt: skip
    batch = ConversationCollator(pad_token_id=0, padding_side="left")(items)
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["pixel_values"].shape == (4, 6) and batch["num_images"].tolist() == [1, 0]


def test_batch_runs_through_a_tiny_llava(processor, tmp_path):
    """The processor's image-token count and the collated batch fit a real (tiny) LlavaForConditionalGeneration."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=168, patch_size=14, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
        image_token_id=processor.tokenizer.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config).eval()
    dataset = ConversationDataset(_mixed_samples(tmp_path), processor, image_root=tmp_path)
    batch = ConversationCollator.from_processor(processor)([dataset[i] for i in range(3)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss)


def _good(sample_id):
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    return {"id": sample_id, "image": "images/test/000000.png", "conversations": turns}


BAD_SAMPLES = {
    "missing image file": (
        {**_good("bad-missing"), "image": "images/test/does_not_exist.png"}, "does_not_exist.png not found"),
    "image without placeholder": (
        {**_good("bad-noplace"), "conversations": [{"from": "human", "value": "What?"},
                                                   {"from": "gpt", "value": "red"}]},
        "no <image>"),
    "empty conversation": ({**_good("bad-empty"), "conversations": []}, "empty conversation"),
    "placeholder without image": (
        {"id": "bad-noimage", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                {"from": "gpt", "value": "red"}]}, "but no image"),
    "more placeholders than images": (
        {**_good("bad-count"), "conversations": [{"from": "human", "value": "<image> and <image>"},
                                                 {"from": "gpt", "value": "red"}]}, "2 <image> placeholders but 1"),
    "no gpt turn": ({**_good("bad-nogpt"), "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}, "no gpt"),
    "placeholder in a gpt turn": (
        {**_good("bad-gptimage"), "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                    {"from": "gpt", "value": "<image>"}]},
        "in turn 1, a 'assistant' turn"),
    "turns do not alternate": (
        {**_good("bad-order"), "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                 {"from": "human", "value": "Hm?"}, {"from": "gpt", "value": "red"}]},
        "alternate"),
    "empty turn": (
        {**_good("bad-blank"), "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                 {"from": "gpt", "value": "  "}]}, "is empty"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_sample_raises_with_id_and_file(processor, tmp_path, case):
    generate_shapes_dataset(tmp_path, 1, seed=0, split="test", progress=False)
    record, reason = BAD_SAMPLES[case]
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_good("ok-1"), record, _good("ok-2")]))
    with pytest.raises(BadSampleError, match=reason) as info:
        ConversationDataset(path, processor)
    message = str(info.value)
    assert repr(record["id"]) in message and str(path) in message
    assert info.value.sample_id == record["id"]


def test_skip_bad_counts_and_logs(processor, tmp_path, caplog):
    generate_shapes_dataset(tmp_path, 1, seed=0, split="test", progress=False)
    records = [_good("ok-0")] + [record for record, _ in BAD_SAMPLES.values()] + [_good("ok-1")]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    with caplog.at_level(logging.WARNING, logger="etc_ext.data.conversation"):
        dataset = ConversationDataset(path, processor, skip_bad=True)
    assert dataset.num_skipped == len(BAD_SAMPLES)
    assert [sample_id for sample_id, _ in dataset.skipped] == [r["id"] for r, _ in BAD_SAMPLES.values()]
    assert len(dataset) == 2 and [dataset[i]["id"] for i in range(2)] == ["ok-0", "ok-1"]
    assert f"skipped {len(BAD_SAMPLES)} bad sample(s)" in caplog.text and "bad-missing" in caplog.text


def test_leading_gpt_turn_is_dropped(processor):
    data = [{"id": "lead", "conversations": [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "Hello"},
                                             {"from": "gpt", "value": "yes"}]}]  # fmt: skip
    item = ConversationDataset(data, processor)[0]
    assert processor.tokenizer.decode(item["input_ids"]) == "<s>USER: Hello ASSISTANT: yes</s>"


def test_unreadable_image_raises_on_access(processor, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    record = {**_good("bad-bytes"), "image": "broken.png"}
    dataset = ConversationDataset([record], processor, image_root=tmp_path)  # exists: passes up-front validation
    with pytest.raises(BadSampleError, match="cannot read image file .*broken.png") as info:
        dataset[0]
    assert "'bad-bytes'" in str(info.value)


@pytest.mark.parametrize("name", ["train.json", "train.jsonl"])
def test_damaged_data_file_names_itself(processor, tmp_path, name):
    path = tmp_path / name
    path.write_text('[{"id": "a", "conversations": [')  # truncated
    with pytest.raises(ValueError, match=f"{name} is not valid json"):
        ConversationDataset(str(path), processor, image_root=tmp_path)


def test_max_length(processor, tmp_path):
    generate_shapes_dataset(tmp_path, 1, seed=0, split="test", progress=False)
    long_answer = " ".join(["red"] * 40)
    record = {**_good("long"), "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                 {"from": "gpt", "value": long_answer}]}  # fmt: skip
    full = ConversationDataset([record], processor, image_root=tmp_path)[0]
    cut = ConversationDataset([record], processor, image_root=tmp_path, max_length=170)[0]
    assert full["input_ids"].shape[0] > 170 and cut["input_ids"].shape[0] == 170
    assert torch.equal(cut["labels"], full["labels"][:170])
    with pytest.raises(BadSampleError, match="'long'.*would cut image tokens"):
        ConversationDataset([record], processor, image_root=tmp_path, max_length=100)[0]
