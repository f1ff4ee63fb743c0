from .bank import WeightBank
from .evolution import EvolutionarySearch, SearchState
from .fitness import FitnessEvaluator

__all__ = ["EvolutionarySearch", "FitnessEvaluator", "SearchState", "WeightBank"]
