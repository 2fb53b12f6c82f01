"""The offline Engine's result formatter: SGLang's dict, its stop trimming, logprob triples (that the
Engine's results equal the server's is tests/managers/test_model_tokenizer_manager.py's)."""

from __future__ import annotations

from crosspool_sgl.result_format import LogprobLists, format_result, ids_to_decode, trim_stop


def test_trim_stop_cuts_at_the_matched_string_unless_asked_not_to():
    reason = {"type": "stop", "matched": "ccc"}
    assert trim_stop("abcccd", reason) == "ab"
    assert trim_stop("abcccd", reason, no_stop_trim=True) == "abccc"  # as SGLang: up to the stop's end
    assert trim_stop("abcccd", {"type": "stop", "matched": 7}) == "abcccd"  # a stop token id
    assert trim_stop("ab", None) == "ab"


def test_a_matched_stop_token_is_not_shown_unless_asked():
    reason = {"type": "stop", "matched": 7}
    assert ids_to_decode([5, 6, 7], reason) == [5, 6]
    assert ids_to_decode([5, 6, 7], reason, no_stop_trim=True) == [5, 6, 7]
    assert ids_to_decode([5, 6, 7], {"type": "stop", "matched": "x"}) == [5, 6, 7]
    assert ids_to_decode([5, 6], {"type": "length", "length": 2}) == [5, 6]


def test_format_result_has_sglang_fields_and_triples():
    lps = LogprobLists(
        output=[(-0.5, 3)], input=[(None, 1), (-1.0, 2)], output_top=[[(-0.5, 3)]], input_top=[None]
    )
    out = format_result("x", [3], {"id": "r"}, lps, decode=lambda t: f"<{t}>")
    meta = out["meta_info"]
    assert (out["text"], out["output_ids"], meta["id"]) == ("x", [3], "r")
    assert meta["output_token_logprobs"] == [[-0.5, 3, "<3>"]]
    assert meta["input_token_logprobs"] == [[None, 1, "<1>"], [-1.0, 2, "<2>"]]
    assert meta["output_top_logprobs"] == [[[-0.5, 3, "<3>"]]] and meta["input_top_logprobs"] == [None]
    plain = format_result("x", [3], {}, LogprobLists(output=[(-0.5, 3)]), decode=None)["meta_info"]
    assert plain["output_token_logprobs"] == [[-0.5, 3, None]] and "output_top_logprobs" not in plain
    assert "output_token_logprobs" not in format_result("x", [3], {}, None, None)["meta_info"]
