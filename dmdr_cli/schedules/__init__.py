"""Time grids and dynamic (DynaDG / DynaRS) schedules: small pure functions of numbers and tensors."""
