"""Running the network: the one ``Predictor`` (every forward pass for answers) and the trainer."""
