"""Promotion: the gate, the evidence it judges, and the model registry (aliases, rollback)."""
