"""Registers ``optimum-cli msp ...`` (Optimum loads every module of the optimum.commands.register namespace;
keep this file light: imports happen inside ``run``)."""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class MSPCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="msp", help="Mixed Sparsity Pruning: prune and evaluate LLMs (optimum-msp).")

    @staticmethod
    def parse_args(parser):
        from optimum_msp.commands.cli import add_subcommands

        add_subcommands(parser)

    def run(self):
        return self.args.func(self.args)


REGISTER_COMMANDS = [MSPCommand]
