"""Engine-side handling of the control commands: weight updates (``weights``), memory release and
resume (``memory``), pause and continue (``pause``), and the ``GenerationGate`` that records what
blocks generation. The engine core dispatches each typed command to one of these.
"""
