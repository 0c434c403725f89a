"""privacy: federated learning (rounds, secure aggregation, differential privacy) and MPC private inference (mpc/)."""
