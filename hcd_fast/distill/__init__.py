"""Distillation on timm models (issue #6)."""
