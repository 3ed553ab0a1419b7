"""Errors caused by the user's input (config, data, paths): reported in one line with what to do, no traceback."""


class UserError(Exception):
    pass
