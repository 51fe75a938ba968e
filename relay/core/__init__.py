"""Pure vocabulary every stage shares: config, clock, model types, the mail log format.

Owns values and their validation. Refuses I/O beyond reading the config file and
writing log lines: no sockets, no database. Imports nothing else from `relay`.
"""
