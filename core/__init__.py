"""What every process shares, below the gateway and the workers: configuration, Redis
connections, NPC personas and the idle face. Imports nothing from gateway/, workers/ or
parley/."""
