"""Rewards: the DAPO math rule (:mod:`.math`) and a timeout-safe worker pool (:mod:`.pool`)."""
