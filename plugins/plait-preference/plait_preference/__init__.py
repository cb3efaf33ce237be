"""Preference tuning (DPO, IPO, ORPO, KTO, SimPO) on Plait's own training loop."""
