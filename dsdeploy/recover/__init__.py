"""Accuracy recovery: least-squares reconstruction, BN re-estimation, distillation, the fine-tune loop, schedules, resume state, metrics, evaluation."""
