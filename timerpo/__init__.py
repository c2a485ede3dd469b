"""TimerPO: GRPO with an OT-grounded, orthogonally projected advantage (AnomSeer, arXiv 2602.08868)."""
