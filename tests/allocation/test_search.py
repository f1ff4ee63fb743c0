import random

import pytest
import torch

from optimum_msp import MSPConfig
from optimum_msp.allocation.search import EvolutionarySearch, FitnessEvaluator, WeightBank
from optimum_msp.modeling.blocks import prunable_layers, weight_matrix
from optimum_msp.modeling.sequential import BlockRunner
from optimum_msp.pruners import get_pruner
from optimum_msp.modeling.weights import WeightSnapshot
from tiny_models import calibration_ids, level_space, tiny_model


def _space(config, units=12, numels=(100, 100, 200)):
    layers = [{f"b{i}.l{j}": None for j in range(len(numels))} for i in range(units)]
    sizes = {f"b{i}.l{j}": numels[j] for i in range(units) for j in range(len(numels))}
    return level_space(config, layers, sizes)


@pytest.mark.parametrize("config", [
    MSPConfig(sparsity=0.7, granularity="layer"),
    MSPConfig(pattern="mixed-n:m", m=8, sparsity=0.75, granularity="layer"),
    MSPConfig(sparsity=0.5),
])
def test_crossover_and_mutation_preserve_the_budget(config):
    space = _space(config)
    quadratic = lambda genome: sum((s - 1) ** 2 for s in genome)
    search = EvolutionarySearch(space, quadratic, space.uniform(), population_size=4, generations=0)
    rng = random.Random(0)
    genomes = [space.uniform()]
    for _ in range(300):
        a, b = rng.choice(genomes), rng.choice(genomes)
        child = search.mutate(search.crossover(a, b, rng), rng, moves=rng.randint(1, 3))
        assert space.is_feasible(child)
        assert space.global_sparsity(child) == pytest.approx(config.resolved().sparsity, abs=1e-12)
        genomes.append(child)
    assert len(set(genomes)) > 50, "moves must actually explore"


def test_quantize_holds_exact_sum_within_bounds():
    space = _space(MSPConfig(sparsity=0.6, granularity="layer", max_deviation=0.1))
    rng = random.Random(1)
    for _ in range(50):
        genome = space.quantize([rng.uniform(0.0, 1.0) for _ in range(len(space))])
        assert space.is_feasible(genome)
        assert space.global_sparsity(genome) == pytest.approx(0.6, abs=1e-12)


def _toy_search(tmp_path=None, generations=6, fitness_log=None):
    space = _space(MSPConfig(sparsity=0.6), units=10, numels=(100,))
    optimum = (4, -4, 2, -2, 0, 0, 1, -1, 3, -3)

    def fitness(genome):
        if fitness_log is not None:
            fitness_log.append(genome)
        return float(sum((g - o) ** 2 for g, o in zip(genome, optimum)))

    checkpoint = str(tmp_path / "search.json") if tmp_path else None
    return EvolutionarySearch(space, fitness, space.uniform(), population_size=8, generations=generations,
                              seed=3, checkpoint=checkpoint)


def test_search_improves_and_never_evaluates_twice():
    calls = []
    search = _toy_search(generations=15, fitness_log=calls)
    best = search.run()
    assert len(calls) == len(set(calls))
    assert search.state.fitness[best] < search.state.fitness[search.space.uniform()]
    assert search.state.history == sorted(search.state.history, reverse=True)


def test_progress_shows_from_the_first_evaluation_with_the_best_so_far(monkeypatch):
    from optimum_msp.allocation.search import evolution

    events = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total = total

        def update(self, n=1):
            events.append(("update", search.state.generation, n))

        def set_postfix(self, **values):
            events.append(("postfix", search.state.generation, values["best"]))

        def close(self):
            pass

    monkeypatch.setattr(evolution.hf_logging, "tqdm", Bar)
    search = _toy_search(generations=3)
    search.run()
    updates = [e for e in events if e[0] == "update"]
    assert updates[0][1] == 0  # the initial population already moves the bar
    assert sum(n for _, _, n in updates) == search.new_evaluations
    bests = [float(best) for kind, _, best in events if kind == "postfix"]
    assert bests == sorted(bests, reverse=True) and bests[-1] == search.state.fitness[search.best]


def test_same_seed_same_result():
    assert _toy_search(generations=8).run() == _toy_search(generations=8).run()


def test_resume_gives_the_uninterrupted_result(tmp_path):
    uninterrupted = _toy_search(generations=8)
    expected = uninterrupted.run()

    first = _toy_search(tmp_path, generations=3)
    first.run()  # "interrupted" after generation 3 (its checkpoint is on disk)
    calls = []
    resumed = _toy_search(tmp_path, generations=8, fitness_log=calls)
    assert resumed.run() == expected
    assert resumed.state.history == uninterrupted.state.history
    assert len(calls) < len(uninterrupted.state.fitness)  # the first generations were not re-evaluated


def _search_parts(arch: str):
    """A tiny model with the level space, runner and Wanda weight bank the MSP search would build (60 %)."""
    from optimum_msp.apply import dense_statistics

    model = tiny_model(arch)
    layers = prunable_layers(model)
    numels = {n: m.weight.numel() for b in layers for n, m in b.items()}
    space = level_space(MSPConfig(method="wanda", sparsity=0.6), layers, numels)
    runner = BlockRunner(model)
    pruner = get_pruner("wanda")
    stats = {}
    for _, block_stats in dense_statistics(runner, layers, calibration_ids(4, 32), pruner.new_statistics):
        stats.update(block_stats)
    modules = {n: m for b in layers for n, m in b.items()}
    return model, space, runner, WeightBank(pruner, modules, WeightSnapshot(modules), stats)


@pytest.fixture(scope="module")
def evaluator_setup():
    return _search_parts("llama")


@pytest.mark.parametrize("kind", ["kl", "ppl"])
def test_fitness_matches_a_full_forward_and_reuses_prefixes(evaluator_setup, kind):
    model, space, runner, bank = evaluator_setup
    ids = calibration_ids(2, 32, seed=11)
    with torch.no_grad():
        dense_logits = model(ids).logits
    evaluator = FitnessEvaluator(runner, space, bank, ids, kind=kind)
    genome = space.quantize([0.5, 0.6, 0.7])
    value = evaluator(genome)
    # the same plan applied directly to the model, evaluated with a plain forward
    for unit, s in zip(space.units, genome):
        for name in unit:
            bank.load(name, space.target(s))
    with torch.no_grad():
        logits = model(ids).logits
    bank.restore()
    if kind == "ppl":
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    else:
        expected = torch.nn.functional.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1),
                                              log_target=True, reduction="sum").item() / ids.numel()
    assert value == pytest.approx(expected, rel=1e-3, abs=1e-6)
    # a genome sharing the first block's level re-runs only the later blocks
    before = evaluator.blocks_run
    sibling = (genome[0], genome[2], genome[1])
    evaluator(sibling)
    assert evaluator.blocks_run - before == 2
    before = evaluator.blocks_run
    assert evaluator(genome) == value  # identical result from the cache path
    assert evaluator.blocks_run - before == 0


def test_bank_restores_dense_weights(evaluator_setup):
    model, space, runner, bank = evaluator_setup
    name = next(iter(bank.modules))
    dense = weight_matrix(bank.modules[name]).clone()
    bank.load(name, space.target(space.upper[0]))
    assert not torch.equal(weight_matrix(bank.modules[name]), dense)
    bank.restore()
    assert torch.equal(weight_matrix(bank.modules[name]), dense)


def test_bank_of_a_masking_pruner_stores_masks_and_gives_the_pruners_weights(evaluator_setup):
    _, space, _, bank = evaluator_setup
    for name in list(bank.modules)[:3]:
        for level in (space.lower[0], space.upper[0]):
            target = space.target(level)
            expected = bank.pruner.prune(bank.dense[name].float(), bank.stats.get(name), target)
            assert torch.equal(bank.weight(name, target), expected)
            assert bank._pruned[(name, target)].dtype == torch.bool  # a quarter of an fp32 copy


def test_memory_accounting_counts_what_the_search_holds(evaluator_setup):
    model, space, runner, shared_bank = evaluator_setup
    shared_bank.restore()
    bank = WeightBank(shared_bank.pruner, shared_bank.modules, shared_bank.snapshot, shared_bank.stats)  # empty
    ids = calibration_ids(2, 32, seed=11)
    evaluator = FitnessEvaluator(runner, space, bank, ids, kind="ppl")
    entry = sum(h.numel() * h.element_size() for h in evaluator.inputs.hidden)
    assert evaluator.nbytes() == {"fitness_inputs": entry, "hidden_cache_peak": 0, "reference_logprobs": 0}
    assert bank.nbytes()["bank"] == 0
    evaluator(space.quantize([0.5, 0.6, 0.7]))
    # one cached output per block; one bank entry per layer, a boolean mask (one byte per weight)
    assert evaluator.nbytes()["hidden_cache_peak"] == len(runner.blocks) * entry
    assert len(bank._pruned) == len(bank.modules)
    assert bank.nbytes()["bank"] == sum(weight.numel() for weight in bank.dense.values())
    assert bank.nbytes()["dense_copy"] == sum(w.numel() * 4 for w in bank.dense.values())
    kl = FitnessEvaluator(runner, space, bank, ids, kind="kl")
    vocab = model.config.vocab_size
    assert kl.nbytes()["reference_logprobs"] == ids.numel() * vocab * 4
    bank.restore()


def test_a_smaller_prefix_cache_costs_block_runs_never_results(evaluator_setup):
    _, space, runner, bank = evaluator_setup
    ids = calibration_ids(2, 32, seed=11)
    genomes = [space.quantize(levels) for levels in ([0.5, 0.6, 0.7], [0.7, 0.6, 0.5], [0.5, 0.7, 0.6])]
    roomy = FitnessEvaluator(runner, space, bank, ids, kind="ppl")
    tight = FitnessEvaluator(runner, space, bank, ids, kind="ppl", cache_bytes=0)
    order = genomes + genomes[:1]  # the first plan comes back after the others pushed it out of the tight cache
    assert [tight(g) for g in order] == [roomy(g) for g in order]
    blocks = len(runner.blocks)
    assert roomy.blocks_run == 3 * blocks - 1  # the third plan shares block 0 with the first; the fourth is cached
    assert tight.blocks_run == 4 * blocks - 1  # only the last plan's outputs stay: the fourth re-runs blocks 1..
    assert tight.nbytes()["hidden_cache_peak"] == blocks * tight.nbytes()["fitness_inputs"]
    bank.restore()


def test_search_cache_size_is_validated():
    with pytest.raises(ValueError, match="search_cache_mb must be a non-negative integer"):
        MSPConfig(search_cache_mb=-1)


def test_fitness_matches_the_model_when_blocks_differ_by_layer_type():
    """On a model with sliding and full attention blocks (different masks and rotary bases per block type),
    the fitness replays each block with its own arguments: the dense loss and a pruned plan's loss are the
    model's own losses on the same windows."""
    model, space, runner, bank = _search_parts("gemma3_text_mixed")
    ids = calibration_ids(2, 32, seed=11)

    def model_loss():
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

    evaluator = FitnessEvaluator(runner, space, bank, ids, kind="ppl")
    dense = evaluator._loss(evaluator._logits(evaluator._run_dense()))
    assert dense == pytest.approx(model_loss(), rel=1e-5)
    genome = space.quantize([0.5 + 0.04 * (i % 5) for i in range(len(space))])
    value = evaluator(genome)
    for unit, s in zip(space.units, genome):
        for name in unit:
            bank.load(name, space.target(s))
    expected = model_loss()
    bank.restore()
    assert value == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------- search checkpoints and their key
def _msp_run(checkpoint, model_seed=0, calibration_seed=0, **overrides):
    from optimum_msp import MSPPruner

    settings = dict(method="wanda", sparsity=0.6, allocation="msp", population_size=4, generations=1,
                    fisher_samples=2, fitness_samples=2, fitness_seqlen=16, search_checkpoint=str(checkpoint))
    settings.update(overrides)
    pruner = MSPPruner(tiny_model("llama", seed=model_seed))
    pruner.prune(MSPConfig(**settings), calibration=calibration_ids(4, 32, seed=calibration_seed),
                 fitness_ids=calibration_ids(settings["fitness_samples"], settings["fitness_seqlen"], seed=7))
    return pruner


@pytest.mark.parametrize("change, differing", [
    (dict(fitness_samples=4), "options.fitness_samples"),
    (dict(fitness_seqlen=24), "options.fitness_seqlen"),
    (dict(level_step=0.05), "options.level_step"),
    (dict(max_deviation=0.1), "options.max_deviation"),
    (dict(granularity="layer"), "options.granularity"),
    (dict(search_statistics="seed"), "statistics"),
    (dict(calibration_seed=1), "calibration_ids"),
    (dict(model_seed=1), "model"),
])
def test_a_checkpoint_written_under_other_settings_is_refused(tmp_path, change, differing):
    checkpoint = tmp_path / "search.json"
    _msp_run(checkpoint)
    written = checkpoint.read_text()
    with pytest.raises(ValueError, match=rf"{checkpoint}.*other settings \(.*{differing}.*search_checkpoint_overwrite"):
        _msp_run(checkpoint, **change)
    assert checkpoint.read_text() == written  # refused: the old checkpoint is kept


def test_the_checkpoint_key_covers_the_pruner_options_and_fitness_windows(tmp_path):
    checkpoint = tmp_path / "search.json"
    _msp_run(checkpoint, method="sparsegpt", search_statistics="dense")
    with pytest.raises(ValueError, match=r"pruner_options\.dampening"):
        _msp_run(checkpoint, method="sparsegpt", search_statistics="dense", dampening=0.05)
    data = __import__("json").loads(checkpoint.read_text())["settings"]
    for key in ("model", "calibration_ids", "fitness_ids", "levels", "pruner_options", "version"):
        assert key in data, key


def test_same_settings_resume_and_overwrite_starts_afresh(tmp_path):
    checkpoint = tmp_path / "search.json"
    first = _msp_run(checkpoint)
    assert first.report["allocation"]["evaluations_this_run"] > 0
    resumed = _msp_run(checkpoint)
    assert resumed.report["allocation"]["evaluations_this_run"] == 0  # same settings: resumed, nothing re-run
    overwritten = _msp_run(checkpoint, fitness_samples=4, search_checkpoint_overwrite=True)
    assert overwritten.report["allocation"]["evaluations_this_run"] > 0
    assert __import__("json").loads(checkpoint.read_text())["settings"]["options"]["fitness_samples"] == 4


def test_an_unreadable_checkpoint_is_named(tmp_path):
    checkpoint = tmp_path / "search.json"
    checkpoint.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{checkpoint} cannot be read"):
        _toy_search(tmp_path).run()
