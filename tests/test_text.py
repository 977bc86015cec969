"""Token rows: the offline tokenizer is CLIP's, the subject-token convention, causal short padding."""

import pytest
import torch

import erasure
from erasure.engine.pipeline import pipeline_state
from erasure.engine.text import encode_texts, split_concepts

PROMPTS = ["a photo of Snoopy", "Van Gogh's Starry Night", "R2-D2  and\tC-3PO", "café — naïve 🙂", ""]


def test_offline_tokenizer_matches_open_clip(pipe):
    import open_clip

    reference = open_clip.get_tokenizer("ViT-L-14")
    for prompt in PROMPTS:
        ours = pipe.tokenizer(prompt).input_ids
        theirs = reference([prompt])[0].tolist()
        assert ours == theirs[: len(ours)]
    assert pipe.tokenizer("a photo of Snoopy").input_ids == [49406, 320, 1125, 539, 41967, 49407]


def test_subject_token_is_last_before_eos_and_bos_for_empty(pipe):
    encoded = encode_texts(pipe, ["a photo of Snoopy", ""])
    assert encoded[0].subject == 4 and encoded[1].subject == 0


def test_short_padding_rows_equal_full_length_rows(pipe):
    # The encoder is causal: rows up to EOS must not depend on how far the batch is padded.
    short = encode_texts(pipe, ["Snoopy", "a much longer concept description here"])
    full = encode_texts(pipe, ["Snoopy", "a much longer concept description here"], full_length=True)
    for s, f in zip(short, full):
        assert torch.allclose(s.rows, f.rows[: len(s.rows)], atol=1e-5, rtol=1e-5)
        assert f.rows.shape[0] == 77


def test_encoding_is_cached(pipe):
    calls = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        encode_texts(pipe, ["cached concept one", "cached concept two"])
        first = len(calls)
        encode_texts(pipe, ["cached concept two", "cached concept one"])
        assert first == 1 and len(calls) == 1
    finally:
        hook.remove()
    assert ("cached concept one", False) in pipeline_state(pipe).text_cache


@pytest.mark.parametrize("text,expected", [("a, b", ["a", "b"]), ("a, b\nc", ["a, b", "c"]), (" ,\n ", []),
                                           ("Van Gogh", ["Van Gogh"]), ("x\n\n y \n", ["x", "y"])])
def test_split_concepts(text, expected):
    assert split_concepts(text) == expected


def test_a_preset_list_survives_the_round_trip_through_a_text_field():
    retain = erasure.load_preset("instance").retain  # holds "Huey, Dewey and Louie"
    assert any("," in concept for concept in retain)
    assert split_concepts("\n".join(retain)) == list(retain)


def test_a_concepts_rows_do_not_depend_on_what_was_encoded_before_or_beside_it(pipe):
    cache = pipeline_state(pipe).text_cache
    for full_length in (False, True):
        cache.clear()
        alone = encode_texts(pipe, ["Snoopy"], full_length)[0].rows
        cache.clear()
        crowd = ["a much longer concept description here", "Pikachu", "Snoopy", *[f"thing {i}" for i in range(40)]]
        beside = encode_texts(pipe, crowd, full_length)[2].rows
        assert torch.equal(alone, beside)


def test_an_edit_is_bitwise_the_same_after_any_history(pipe):
    cache = pipeline_state(pipe).text_cache
    request = dict(targets=["Snoopy", "Mickey"], anchors=[""], retain=["Pikachu", "Garfield", "Huey, Dewey and Louie"])
    cache.clear()
    first = erasure.erase(pipe, "uce", **request)
    cache.clear()
    encode_texts(pipe, ["a much longer concept description here", "Pikachu", "Snoopy", "Mickey",
                        *[f"thing {i}" for i in range(40)]])  # the same concepts, first met in another batch
    erasure.erase(pipe, "speed", ["Totoro"], [""], ["Garfield", "Bambi"])
    again = erasure.erase(pipe, "uce", **request)
    assert all(torch.equal(again.patches[key].value, p.value) for key, p in first.patches.items())


def test_content_rows_start_after_a_start_token_only_where_the_tokenizer_has_one():
    """CLIP puts BOS first (content from row 1); T5 puts none ("a cat" -> [a, cat, </s>]: content from row 0).
    The all-token rows of SPEED and ScaPre start there."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from erasure.engine.text import content_start
    from erasure.worlds.tiny import clip_tokenizer

    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "cat": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5_like = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", unk_token="<unk>")
    assert t5_like("a cat").input_ids == [2, 3, 1]
    assert content_start(t5_like) == 0 and content_start(clip_tokenizer()) == 1
