"""Trained assets shipped with dmdr: ``digits-teacher/`` (the tiny-sd3 default, scripts/train_digits_teacher.py)."""
