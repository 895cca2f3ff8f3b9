"""`python -m loratorio.demo`: LoRAtorio and the baselines side by side on the bundled CPU miniature."""
