"""Live decoding: a spike stream in over Lab Streaming Layer, predictions out (issue 29).

streams.py: the stream formats and liblsl kept on this machine; replay.py: a stored session played
to LSL as a rig would stream it.
"""
