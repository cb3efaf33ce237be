"""The support matrix: ``plait models`` and the markdown ``docs/models.md`` is made of.

The rows come from real conformance checks (``plait.conformance``) on a tiny
llama and a tiny cohere (the logits check only, so the test stays fast); the
stored matrix (``support_matrix.json``, from the last full sweep) must cover
every causal-LM model type of the installed transformers it was made with.
"""

from __future__ import annotations

import json

import pytest

from plait.testing import run_cli
from plait_models.support import counts, family_facts, load_matrix, render_markdown, summarize, table_rows


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    from plait.conformance import check_architecture

    tokenizer = tmp_path_factory.mktemp("tok")
    from plait.testing import make_tiny_tokenizer

    make_tiny_tokenizer(tokenizer)
    return [check_architecture(t, tmp_path_factory.mktemp(t), checks=("logits",), tokenizer_dir=tokenizer)
            for t in ("llama", "cohere")]


def test_rows_say_which_loss_input_each_model_gets(checked):
    llama, cohere = (summarize(r) for r in checked)
    assert llama["logits"]["status"] == cohere["logits"]["status"] == "pass"
    assert llama["loss_path"] == "fused head"
    assert cohere["loss_path"] == "model logits"  # logit_scale: the fused head cannot reproduce it


def test_markdown_has_a_row_per_type_with_family_facts(checked):
    matrix = {"transformers": "x.y", "rows": [summarize(r) for r in checked]}
    text = render_markdown(matrix, family_facts())
    llama_row = next(line for line in text.splitlines() if line.startswith("| llama |"))
    # llama has a family: RMSNorm and MLP kernel swaps and a TP plan; cohere is generic
    assert "RMSNorm, MLP" in llama_row and llama_row.rstrip(" |").endswith("yes")
    assert next(line for line in text.splitlines() if line.startswith("| cohere |")).split(" | ")[1] == "generic"
    assert counts(matrix["rows"])["logits"] == 2 and "transformers x.y" in text


def test_plait_models_lists_the_stored_matrix():
    matrix = load_matrix()
    if not matrix["rows"]:
        pytest.skip("no support matrix generated yet (bench/architectures.py --matrix)")
    result = run_cli(["models"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["architecture", "family", "LoRA", "full"]
    assert {line.split()[0] for line in lines[1:] if line.strip() and not line.startswith("transformers")} == {
        row["model_type"] for row in matrix["rows"]}
    picked = run_cli(["models", "--json", "llama"])
    assert [row["model_type"] for row in json.loads(picked.stdout)["rows"]] == ["llama"]
    assert len(table_rows(matrix, family_facts())) == len(matrix["rows"])


def test_plait_models_names_an_unknown_type():
    if not load_matrix()["rows"]:
        pytest.skip("no support matrix generated yet")
    result = run_cli(["models", "no_such_type"])
    assert result.exit_code == 2 and "no_such_type" in result.stderr and "bench/architectures.py" in result.stderr


def test_stored_matrix_covers_every_causal_lm_type_of_its_transformers():
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    matrix = load_matrix()
    if matrix.get("transformers") != transformers.__version__:
        pytest.skip(f"matrix made with transformers {matrix.get('transformers')}, {transformers.__version__} here")
    assert {row["model_type"] for row in matrix["rows"]} == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
