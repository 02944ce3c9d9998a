"""Training losses (DMD, fake score, RL plug-ins) as small pure functions working in x0 space."""
