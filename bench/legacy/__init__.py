"""The codec and messages of protocol 2 before msgspec: the baseline of bench/decode_cost.py."""
