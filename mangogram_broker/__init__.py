"""The MangoGram broker: a pure routing core and the ZeroMQ shell around it."""
