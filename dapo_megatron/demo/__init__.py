"""The CPU demo: a bundled one-digit addition task (:mod:`.task`), its warm-started tiny policy
(:mod:`.model`), and ``python -m dapo_megatron.demo`` (:mod:`.__main__`), what ``make demo`` runs."""
