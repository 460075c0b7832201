"""Training methods: each owns its networks, losses and update rules."""
