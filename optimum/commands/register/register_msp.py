"""Registers ``optimum-cli msp ...`` (Optimum loads every module of the optimum.commands.register namespace;
keep this file light: imports happen inside ``parse_args``)."""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class MSPCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="msp", help="Mixed Sparsity Pruning: prune, evaluate, inspect and publish LLMs "
                                           "(optimum-msp).")

    @staticmethod
    def parse_args(parser):
        from optimum_msp.commands.cli import add_subcommands

        # each verb's args.func(args) is what optimum-cli calls .run() on; run() exits with the verb's status
        add_subcommands(parser, for_optimum_cli=True)

    def run(self):
        self.parser.print_help()  # `optimum-cli msp` without a verb


REGISTER_COMMANDS = [MSPCommand]
