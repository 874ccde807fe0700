"""What acts and what learns to act: exploration policies, controller, CMA-ES, rollouts."""
