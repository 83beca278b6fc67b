"""Which learner a run's settings call for: its mode."""

from __future__ import annotations

from streamem_connectors.kafka.learner import Learner
from streamem_connectors.kafka.learners import InstanceLearner, KeyedLearner
from streamem_connectors.kafka.regime_replication import ReplicatedRegimeLearner
from streamem_connectors.kafka.regimes import RegimeLearner
from streamem_connectors.kafka.replication import ReplicatedLearner
from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = ["make_learner"]


def make_learner(settings: ConsumerSettings, store) -> Learner:
    """The learner of this run's mode: a hidden Markov model (replicated, or the instance's), a replicated
    mixture, one model per key, or one model for the instance."""
    if settings.model == "hmm":
        return ReplicatedRegimeLearner(settings, store) if settings.replicate else RegimeLearner(settings, store)
    if settings.replicate:
        return ReplicatedLearner(settings, store)
    return KeyedLearner(settings, store) if settings.model_key else InstanceLearner(settings, store)
