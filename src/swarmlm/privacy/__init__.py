"""Privacy services: federated learning and MPC private inference (mpc/)."""
