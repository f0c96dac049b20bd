"""Evaluation at generate() speed on SmolLM2: batched, left-padded, KV-cached greedy answers equal
``model.generate`` on each prompt alone, whichever attention the model runs ("ragkern" included)."""

import pytest
import torch

from ragkern.data import render_prompt
from ragkern.data.counterfactual import counterfactual_records
from ragkern.evaluate import generate_answers, stop_token_ids

MAX_NEW = 6


@pytest.fixture(scope="module")
def records():
    return counterfactual_records(4, seed=7, num_passages=(1, 3), facts_per_passage=2)


@pytest.fixture(scope="module")
def expected(smollm2_model, smollm2_tokenizer, records):
    """``model.generate`` on each prompt alone (no padding), greedy, stopping at the same tokens."""
    tok, model = smollm2_tokenizer, smollm2_model
    model.set_attn_implementation("sdpa")
    stop = sorted(stop_token_ids(model, tok))
    out = []
    for r in records:
        ids = tok(render_prompt(r, tok), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            row = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tok.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        cut = next((k for k, t in enumerate(row) if t in stop), len(row))
        out.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    model.set_attn_implementation("ragkern")
    return out


def test_prompts_differ_in_length(smollm2_tokenizer, records, expected):
    lengths = {len(smollm2_tokenizer(render_prompt(r, smollm2_tokenizer))["input_ids"]) for r in records}
    assert len(lengths) > 1  # the batches below are left-padded
    assert all(expected) and any(len(e.split()) > 1 for e in expected)


@pytest.mark.parametrize("name", ["ragkern", "sdpa", "eager"])
def test_batched_answers_equal_generate_alone(
    smollm2_model, smollm2_tokenizer, records, expected, attn, name
):
    model = attn(name)
    assert (
        generate_answers(model, smollm2_tokenizer, records, batch_size=4, max_new_tokens=MAX_NEW) == expected
    )
