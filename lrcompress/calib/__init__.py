"""Calibration inputs made from the model itself when the user gives no data (data-free mode)."""
