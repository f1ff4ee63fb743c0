"""Zero-shot evaluation: scoring engine vs. a hand-written reference, lm-eval prompt formats, metrics, exports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from optimum_msp.evaluation import zeroshot
from optimum_msp.evaluation.zeroshot import hellaswag, scoring
from optimum_msp.evaluation.zeroshot.data import resolve_limit
from optimum_msp.evaluation.zeroshot.evaluator import _aggregate
from optimum_msp.evaluation.zeroshot.registry import MULTIPLE_CHOICE, DocRequests, ZeroShotTask
from optimum_msp.evaluation.zeroshot.results import mean_stderr, perplexity
from optimum_msp.evaluation.zeroshot.scoring import LoglikelihoodScorer
from optimum_msp.evaluation.zeroshot.tokenization import encode_pair
from optimum_msp.utils import local_data_dir

METRIC_FOLDER = Path(zeroshot.__file__).resolve().parents[1] / "metrics" / "zero_shot"

CORPUS = [
    "question: what is the answer?\nanswer: yes",
    "true or false? the sun is hot. answer: no",
    "the cat sat on the mat and the dog runs in the park.",
    "a man is sitting on a roof. he starts pulling up roofing.",
    "which gas do plants take in? carbon dioxide, oxygen, water.",
] * 4 + ["answer: yes answer: no yes no the sat"] * 8  # makes " yes", " no", " sat" single tokens


# ---------------------------------------------------------------- tiny models and tokenizer
@pytest.fixture(scope="module")
def tokenizer():
    """A lower-casing BPE with a Metaspace pre-tokenizer (spaces are part of tokens, as in GPT-2/LLaMA)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    backend.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<eos>"], show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def _tiny_model(arch: str, vocab_size: int):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             initializer_range=0.2)
    else:
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=256,
                            initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    return _tiny_model(request.param, len(tokenizer))


@torch.no_grad()
def reference_score(model, context_ids, continuation_ids):
    """By hand: one plain full forward of context+continuation, log-softmax, sum over the continuation."""
    ids = torch.tensor([list(context_ids) + list(continuation_ids)])
    logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    total, greedy = 0.0, True
    for offset, token in enumerate(continuation_ids):
        position = len(context_ids) + offset - 1  # logits at position p predict token p + 1
        total += logprobs[position, token].item()
        greedy &= logprobs[position].argmax().item() == token
    return total, greedy


# Shared contexts of different lengths (padding holes), single- and multi-token continuations, one lone context.
REQUESTS = [
    ("question: what is the answer?\nanswer:", " yes"),
    ("question: what is the answer?\nanswer:", " no"),
    ("question: what is the answer?\nanswer:", " the cat sat on the mat"),
    ("the sun", " is hot."),
    ("the sun", " runs in the park and the dog sleeps."),
    ("a man is sitting on a roof. he", " starts pulling up roofing."),
    ("a man is sitting on a roof. he", " is hot."),
    ("a man is sitting on a roof. he", " sat"),
    ("a man is sitting on a roof. he", " runs in the park."),
    ("which gas do plants take in?", " carbon dioxide"),
]


# ---------------------------------------------------------------- scoring engine
@pytest.mark.parametrize("share_context, batch_size, max_tokens",
                         [(True, 1, 4096), (True, 3, 4096), (True, 64, 4096), (True, 64, 20), (False, 3, 4096),
                          (False, 64, 20)])
def test_scores_equal_a_full_forward_per_choice(model, tokenizer, batch_size, share_context, max_tokens):
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=batch_size, share_context=share_context,
                                 show_progress=False, max_batch_tokens=max_tokens)
    pairs = scorer.tokenize(REQUESTS)
    scores = scorer.score_tokens(pairs)
    for (context, continuation), (value, greedy) in zip(pairs, scores):
        expected, expected_greedy = reference_score(model, context, continuation)
        assert value == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


def test_shared_context_runs_each_context_once(model, tokenizer):
    """The speed claim: one row per distinct shared context, then rows only for multi-token continuations."""
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=64, show_progress=False)
    pairs = scorer.tokenize(REQUESTS)
    try:
        scorer.score_tokens(pairs)
    finally:
        hook.remove()
    shared = [pair for pair in pairs if sum(other[0] == pair[0] for other in pairs) > 1]
    multi_token = sum(len(continuation) > 1 for _, continuation in shared)
    assert 0 < multi_token < len(shared)  # the example has both kinds
    # 3 shared contexts in one forward, one continuation pass, then the lone request as a full sequence
    assert [shape[0] for shape in calls] == [3, multi_token, 1]
    assert calls[0][1] == max(len(context) for context, _ in shared)


@pytest.mark.parametrize("share_context", [True, False])
def test_token_cap_bounds_every_forward(model, tokenizer, share_context):
    shapes = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append((kwargs["input_ids"].shape, kwargs.get("past_key_values"))),
        with_kwargs=True,
    )
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=64, share_context=share_context,
                                 show_progress=False, max_batch_tokens=24)
    try:
        scorer.score_tokens(scorer.tokenize(REQUESTS))
    finally:
        hook.remove()
    assert len(shapes) > 3  # the cap split what batch_size alone would run in two or three forwards
    for (rows, width), cache in shapes:
        cached = cache.get_seq_length() if cache is not None else 0
        assert rows == 1 or rows * (width + cached) <= 24


def test_batches_cut_where_padding_would_waste_compute(model, tokenizer):
    """Sorted longest first, a batch stops taking much shorter items once it is big enough to be worth a forward."""
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=64, show_progress=False, max_batch_tokens=10**6)
    lengths = [100, 100, 100, 95, 50, 50, 49, 10]
    batches = [[lengths[i] for i in batch] for batch in scorer._batches(range(len(lengths)), lengths.__getitem__)]
    # 100 x 4 rows reach the minimum size; 50 would pad by half: new batch. 50-49 ok; 10 is too short again
    # but 3 rows x 50 are still below the minimum, so it stays (tiny batches cost more than their padding).
    assert batches == [[100, 100, 100, 95], [50, 50, 49, 10]]
    assert sum(batches, []) == lengths


def test_continuation_batches_judge_padding_on_new_tokens_only(model, tokenizer):
    """Rows of equal continuation width are not cut apart by their (varying) cached context lengths, which
    still count against the token cap."""
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=4, show_progress=False, max_batch_tokens=10**6)
    contexts = [300, 20, 280, 10, 250, 30, 320, 15]  # the continuation of every row is 10 tokens wide
    with_context = lambda i: contexts[i] + 10  # noqa: E731
    assert list(scorer._batches(range(8), with_context, padded=lambda i: 10)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(list(scorer._batches(range(8), with_context))) > 2  # judged on context + continuation: cut apart
    scorer.max_batch_tokens = 1000  # the cap still counts the context: 4 rows x 330 > 1000
    assert list(scorer._batches(range(8), with_context, padded=lambda i: 10)) == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_context_windows_are_bounded_in_tokens(model, tokenizer):
    """The caches held at once (for regrouping continuations) stay within a few token budgets."""
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=64, show_progress=False, max_batch_tokens=10)
    groups = [(tuple(range(12)), [2 * i, 2 * i + 1]) for i in range(20)]
    windows = list(scorer._windows(groups))
    assert len(windows) > 1
    assert [group for window in windows for group in window] == groups
    for window in windows:
        assert len(window) == 1 or sum(len(context) for context, _ in window) <= 10 * scoring._WINDOW_CONTEXT_BUDGETS


def test_target_scores_equal_log_softmax_and_argmax_with_first_index_ties():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50) * 4
    targets = torch.randint(0, 50, (3, 5))
    targets[0, 3:] = -1  # unscored tail
    logits[1, :, 7] = 40.0  # row 1: every target is the argmax
    targets[1] = 7
    logits[2, :, 7] = 40.0  # row 2: the target ties the maximum at a later index, which argmax does not pick
    logits[2, 2, 9] = 40.0
    targets[2] = 7
    targets[2, 2] = 9
    sums, greedy = scoring._score_targets(logits.clone(), targets)  # it spends its input
    logprobs = F.log_softmax(logits, dim=-1)
    scored = targets >= 0
    expected = torch.where(scored, logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0).sum(1)
    torch.testing.assert_close(sums, expected)
    expected_greedy = ((logprobs.argmax(-1) == targets) | ~scored).all(1)
    assert greedy.tolist() == expected_greedy.tolist() == [False, True, False]


def test_all_tiny_architectures_agree_with_reference(tokenizer):
    """Every architecture of the shared tiny-model matrix (incl. a sliding window shorter than the texts)."""
    tiny_models = pytest.importorskip("tiny_models")
    if len(tokenizer) > tiny_models.VOCAB:
        pytest.skip("tokenizer larger than the tiny models' vocabulary")
    for arch in sorted(set(tiny_models.ARCHITECTURES) - {"llama", "gpt2"}):  # those two are tested above
        model = tiny_models.tiny_model(arch)
        scorer = LoglikelihoodScorer(model, tokenizer, batch_size=8, show_progress=False)
        pairs = scorer.tokenize(REQUESTS)
        for (context, continuation), (value, greedy) in zip(pairs, scorer.score_tokens(pairs)):
            expected, expected_greedy = reference_score(model, context, continuation)
            assert value == pytest.approx(expected, abs=1e-4), arch
            assert greedy == expected_greedy, arch


def test_scoring_is_deterministic_and_restores_training_mode(tokenizer):
    model = _tiny_model("llama", len(tokenizer)).train()
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=4, show_progress=False)
    assert scorer.score(REQUESTS) == scorer.score(REQUESTS)
    assert model.training


# ---------------------------------------------------------------- tokenization (lm-eval's _encode_pair)
def test_trailing_context_space_moves_to_the_continuation(tokenizer):
    assert encode_pair(tokenizer, "answer: ", "yes") == encode_pair(tokenizer, "answer:", " yes")
    context_ids, continuation_ids = encode_pair(tokenizer, "answer:", " yes")
    assert context_ids + continuation_ids == tokenizer.encode("answer: yes")
    assert tokenizer.convert_ids_to_tokens(continuation_ids) == ["▁yes"]


def test_bos_tokenizer_prefixes_context_only(tokenizer):
    """A tokenizer that adds BOS by default (LLaMA-2 style) gets it once, at the start of the context."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    eos = tokenizer.eos_token_id
    backend.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", eos)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<eos>", eos_token="<eos>")
    context_ids, continuation_ids = encode_pair(with_bos, "answer:", " yes")
    assert context_ids[0] == eos and eos not in continuation_ids
    assert context_ids[1:] + continuation_ids == tokenizer.encode("answer: yes")
    # text that already starts with BOS does not get a second one; an empty context becomes the BOS token
    assert encode_pair(with_bos, "<eos>answer:", " yes")[0].count(eos) == 1
    assert encode_pair(with_bos, "", " yes") == ([eos], tokenizer.encode(" yes"))


# ---------------------------------------------------------------- metrics
def test_mean_stderr_is_lm_evals_sample_stderr():
    values = [1.0, 0.0, 1.0, 1.0]
    p, n = 0.75, 4
    assert mean_stderr(values) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert math.isnan(mean_stderr([1.0]))
    assert perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))


def _constructed_task():
    return ZeroShotTask(name="constructed", pretty_name="constructed", output_type=MULTIPLE_CHOICE, hub=(),
                        local=None, doc_to_text=str, doc_to_target=str, metrics=("acc", "acc_norm"))


def test_acc_and_acc_norm_pick_by_raw_and_length_normalised_loglikelihood():
    # doc 0: raw ll prefers "a" (-2 > -3); per character "bbbbbbbb" wins (-3/8 > -2/1); gold is choice 1.
    # doc 1: a tie goes to the first choice, as numpy.argmax does; gold is choice 0.
    docs = [DocRequests([("q", " a"), ("q", " bbbbbbbb")], gold=1, choices=["a", "bbbbbbbb"]),
            DocRequests([("q", " x"), ("q", " y")], gold=0, choices=["x", "y"])]
    scores = [(-2.0, False), (-3.0, False), (-1.0, False), (-1.0, False)]
    result = _aggregate(_constructed_task(), docs, scores, log_samples=True)
    assert [s["prediction"] for s in result.samples] == [0, 0]
    assert [s["prediction_norm"] for s in result.samples] == [1, 0]
    assert result.acc == 0.5 and result.acc_norm == 1.0
    assert result.acc_stderr == pytest.approx(mean_stderr([0.0, 1.0]))


def test_acc_norm_divides_by_characters_not_bytes():
    # "aaa" is 3 characters and 3 bytes, "éé" 2 characters but 4 bytes (UTF-8).
    # per character: -3.3/3 = -1.1 > -2.4/2 = -1.2 -> choice 0; per byte it would be -2.4/4 = -0.6 -> choice 1.
    docs = [DocRequests([("q", " aaa"), ("q", " éé")], gold=1, choices=["aaa", "éé"])]
    result = _aggregate(_constructed_task(), docs, [(-3.3, False), (-2.4, False)], log_samples=True)
    assert result.samples[0]["prediction_norm"] == 0
    assert result.acc_norm == 0.0 and result.acc == 1.0


def test_limit_semantics_follow_lm_eval():
    assert resolve_limit(None, 10) == 10
    assert resolve_limit(3, 10) == 3
    assert resolve_limit(30, 10) == 10
    assert resolve_limit(0.25, 10) == 3  # fraction: ceil(2.5)
    assert resolve_limit(1.0, 10) == 1  # 1.0 is not a fraction in lm-eval: it means one document


# ---------------------------------------------------------------- end to end on hand-made local files
def _write_arc(folder: Path, rows):
    (folder / "arc_easy").mkdir(parents=True)
    with open(folder / "arc_easy" / "test.jsonl", "w") as handle:
        for index, (stem, choices, answer) in enumerate(rows):
            labels = "ABCDE"[: len(choices)]
            question = {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(choices, labels)]}
            handle.write(json.dumps({"id": f"q{index}", "question": question, "answerKey": answer}) + "\n")


ARC_ROWS = [
    ("what is the answer?", ["yes", "no", "the cat sat on the mat"], "A"),
    ("which gas do plants take in?", ["carbon dioxide", "oxygen", "water"], "A"),
    ("the sun is", ["hot", "on the mat", "a dog", "in the park"], "B"),
    ("a man is sitting on a roof. he", ["starts pulling up roofing.", "sat", "runs"], "C"),
]


@pytest.fixture()
def arc_folder(tmp_path):
    _write_arc(tmp_path, ARC_ROWS)
    return tmp_path


def test_evaluate_tasks_matches_hand_computed_accuracy(model, tokenizer, arc_folder):
    expected_acc, expected_norm = [], []
    for stem, choices, answer in ARC_ROWS:
        context = f"Question: {stem}\nAnswer:"
        lls = []
        for choice in choices:
            context_ids, continuation_ids = encode_pair(tokenizer, context, " " + choice)
            lls.append(reference_score(model, context_ids, continuation_ids)[0])
        gold = "ABCDE".index(answer)
        expected_acc.append(float(max(range(len(lls)), key=lambda i: (lls[i], -i)) == gold))
        normalised = [ll / len(choice) for ll, choice in zip(lls, choices)]
        expected_norm.append(float(max(range(len(lls)), key=lambda i: (normalised[i], -i)) == gold))

    results = zeroshot.evaluate_tasks(model, tokenizer, tasks=["arc_easy"], data_dir=arc_folder, batch_size=5,
                                      show_progress=False)
    result = results["arc_easy"]
    assert result.n == len(ARC_ROWS)
    assert result.acc == pytest.approx(sum(expected_acc) / len(ARC_ROWS))
    assert result.acc_norm == pytest.approx(sum(expected_norm) / len(ARC_ROWS))
    assert result.acc_stderr == pytest.approx(mean_stderr(expected_acc))

    limited = zeroshot.evaluate_tasks(model, tokenizer, tasks="arc_easy", data_dir=arc_folder, limit=2,
                                      show_progress=False, log_samples=True)
    assert limited["arc_easy"].n == 2 and [s["doc"] for s in limited["arc_easy"].samples] == [0, 1]


def test_lambada_accuracy_is_greedy_match_and_perplexity_per_document(model, tokenizer, tmp_path):
    texts = ["the cat sat on the mat", "the dog runs in the park", "he starts pulling up roofing"]
    (tmp_path / "lambada_openai").mkdir()
    (tmp_path / "lambada_openai" / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    lls, greedy = [], []
    for text in texts:
        context, target = text.rsplit(" ", 1)
        value, is_greedy = reference_score(model, *encode_pair(tokenizer, context, " " + target))
        lls.append(value)
        greedy.append(float(is_greedy))
    result = zeroshot.evaluate_tasks(model, tokenizer, tasks=["lambada_openai"], data_dir=tmp_path,
                                     show_progress=False)["lambada_openai"]
    assert result.perplexity == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)
    assert result.acc == pytest.approx(sum(greedy) / len(greedy))


def test_results_export_json_and_model_index(model, tokenizer, arc_folder, tmp_path):
    from huggingface_hub.repocard_data import model_index_to_eval_results

    results = zeroshot.evaluate_tasks(model, tokenizer, tasks=["arc_easy"], data_dir=arc_folder,
                                      show_progress=False)
    saved = json.loads(results.to_json(tmp_path / "out" / "zeroshot.json").read_text())
    assert saved["results"]["arc_easy"]["acc"] == results["arc_easy"].acc
    assert saved["results"]["arc_easy"]["n"] == len(ARC_ROWS)

    model_index = results.to_model_index("tiny-pruned")
    name, eval_results = model_index_to_eval_results(model_index)  # the Hub's own parser accepts it
    assert name == "tiny-pruned"
    by_metric = {result.metric_type: result for result in eval_results}
    assert set(by_metric) == {"acc", "acc_norm"}
    assert by_metric["acc"].task_type == "text-generation"
    assert by_metric["acc"].dataset_type == "allenai/ai2_arc"
    assert by_metric["acc"].dataset_config == "ARC-Easy" and by_metric["acc"].dataset_split == "test"
    assert by_metric["acc_norm"].metric_value == results["arc_easy"].acc_norm
    assert "| arc_easy |" in results.to_markdown()


def test_evaluate_module_loads_offline_and_matches(model, tokenizer, arc_folder):
    import evaluate

    module = evaluate.load(str(METRIC_FOLDER))
    computed = module.compute(tasks=["arc_easy"], model=model, tokenizer=tokenizer, data_dir=str(arc_folder),
                              show_progress=False)
    direct = zeroshot.evaluate_tasks(model, tokenizer, tasks=["arc_easy"], data_dir=arc_folder,
                                     show_progress=False)
    assert computed["arc_easy"]["acc"] == direct["arc_easy"].acc
    assert computed["arc_easy"]["acc_norm"] == direct["arc_easy"].acc_norm


def test_unknown_task_is_reported_before_any_work(model, tokenizer):
    with pytest.raises(KeyError, match="available"):
        zeroshot.evaluate_tasks(model, tokenizer, tasks=["arc_easyy"])


def test_hub_fallback_asks_for_lm_evals_dataset_then_mirrors(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "aps/super_glue":
            raise ConnectionError("offline")
        return datasets.Dataset.from_dict({"question": ["is it"], "passage": ["It is."], "idx": [0], "label": [1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = zeroshot.load_task_docs(zeroshot.get_task("boolq"), data_dir=tmp_path)  # empty folder -> Hub
    assert calls == [("aps/super_glue", "boolq", "validation"), ("super_glue", "boolq", "validation")]
    assert docs == [{"question": "is it", "passage": "It is.", "idx": 0, "label": 1}]

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(RuntimeError, match="OPTIMUM_MSP_DATA_DIR"):
        zeroshot.load_task_docs(zeroshot.get_task("piqa"), from_hub=True)


# ---------------------------------------------------------------- prompts vs lm-eval, on real local rows
def test_hellaswag_context_split_recovers_ctx_b():
    assert hellaswag.split_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert hellaswag.split_context("How to dye hair. Wash it first.") == ("How to dye hair. Wash it first.", "")
    assert hellaswag.split_context("the lady") == ("", "the lady")
    doc = hellaswag.process_doc({"activity_label": "Canoeing", "ctx_a": "", "ctx_b": "the child and a man",
                                 "endings": ["x [title] y", "a  b"], "label": "1"})
    assert doc["query"] == "Canoeing: The child and a man"
    assert doc["choices"] == ["x. y", "a b"] and doc["gold"] == 1


needs_local_data = pytest.mark.skipif(local_data_dir() is None, reason="no local data folder (shared/data)")

# First document of each local file, as lm-eval-harness 0.4.13 builds its requests (checked against the
# `arguments` lm-eval logged for these rows with --log_samples on the same files).
FIRST_ROW_REQUESTS = {
    "arc_easy": ("Question: Which statement best explains why photosynthesis is the foundation of most food "
                 "webs?\nAnswer:", " Sunlight is the source of energy for nearly all ecosystems.", 4, 0),
    "arc_challenge": ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
                      "Which is the most likely effect of this increase in rotation?\nAnswer:",
                      " Planetary density will decrease.", 4, 2),
    "openbookqa": ("A person wants to start saving money so that they can afford a nice vacation at the end of "
                   "the year. After looking over their budget and expenses, they decide the best way to save "
                   "money is to", " make more phone calls", 4, 1),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
             " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
             "will also need to supply it with a water bottle and a food dish.", 2, 0),
    "rte": ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according "
            "to the Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an accident. True or "
            "False?\nAnswer:", " True", 2, 1),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis.",
                  4, 3),
    "winogrande": ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases.", 2, 1),
}


@needs_local_data
@pytest.mark.parametrize("name", sorted(FIRST_ROW_REQUESTS))
def test_first_local_row_is_formatted_like_lm_eval(name):
    context, continuation, count, gold = FIRST_ROW_REQUESTS[name]
    task = zeroshot.get_task(name)
    doc = task.build_requests(zeroshot.load_task_docs(task, limit=1)[0])
    assert doc.requests[0] == (context, continuation)
    assert len(doc.requests) == count and doc.gold == gold


@needs_local_data
def test_boolq_and_lambada_first_rows():
    boolq = zeroshot.get_task("boolq")
    doc = boolq.build_requests(zeroshot.load_task_docs(boolq, limit=1)[0])
    context = doc.requests[0][0]
    assert context.startswith("Ethanol fuel -- All biomass goes through")
    assert context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in doc.requests] == [" no", " yes"] and doc.gold == 0  # label False -> "no"

    lambada = zeroshot.get_task("lambada_openai")
    doc = lambada.build_requests(zeroshot.load_task_docs(lambada, limit=1)[0])
    (context, target), = doc.requests
    assert target == " signs" and context.endswith("I don't care about")


@needs_local_data
def test_limit_takes_the_first_documents_in_file_order():
    docs = zeroshot.load_task_docs(zeroshot.get_task("piqa"), limit=3)
    with open(local_data_dir() / "piqa" / "valid.jsonl") as handle:
        goals = [json.loads(next(handle))["goal"] for _ in range(3)]
    assert [doc["goal"] for doc in docs] == goals
    labels = (local_data_dir() / "piqa" / "valid-labels.lst").read_text().split()[:3]
    assert [doc["label"] for doc in docs] == [int(label) for label in labels]


# ---------------------------------------------------------------- real model (slow)
# Per-choice loglikelihoods lm-evaluation-harness 0.4.13 logged (--log_samples, HFLM, fp32, CPU) for the first
# documents of the local files, through task yamls that only swap the Hub dataset for these files.
LM_EVAL_LOGLIKELIHOODS = {
    "arc_easy": [[-23.5434, -34.0631, -32.4486, -29.2241], [-15.3628, -16.444, -15.4261, -21.4082],
                 [-21.1215, -25.0875, -23.0816, -20.1926]],
    "piqa": [[-110.6986, -110.9827], [-48.0457, -68.3027]],
    "winogrande": [[-27.4236, -25.0687], [-27.4961, -24.8498], [-17.5346, -17.817]],
    "lambada_openai": [[-5.0284], [-5.1841], [-0.7106]],
}


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from optimum_msp.modeling import load_model, load_tokenizer

    return load_model(smollm2_path), load_tokenizer(smollm2_path)


@pytest.mark.slow
@needs_local_data
@pytest.mark.parametrize("share_context", [True, False])
def test_smollm2_loglikelihoods_equal_lm_eval(smollm2, share_context):
    model, tokenizer = smollm2
    for task, expected in LM_EVAL_LOGLIKELIHOODS.items():
        result = zeroshot.evaluate_tasks(model, tokenizer, tasks=[task], limit=len(expected), log_samples=True,
                                         share_context=share_context, show_progress=False)[task]
        for sample, reference in zip(result.samples, expected):
            values = sample.get("loglikelihoods", [sample.get("loglikelihood")])
            assert values == pytest.approx(reference, abs=2e-3), task


@pytest.mark.slow
@needs_local_data
def test_smollm2_shared_context_equals_per_choice_scoring_on_hellaswag(smollm2):
    model, tokenizer = smollm2
    runs = [zeroshot.evaluate_tasks(model, tokenizer, tasks=["hellaswag"], limit=4, log_samples=True,
                                    share_context=share, show_progress=False)["hellaswag"] for share in (True, False)]
    for shared, naive in zip(runs[0].samples, runs[1].samples):
        assert shared["loglikelihoods"] == pytest.approx(naive["loglikelihoods"], abs=1e-3)
    assert (runs[0].acc, runs[0].acc_norm) == (runs[1].acc, runs[1].acc_norm)
