"""The training core: what every DeepSpeed job of fastroberta shares, whatever it trains. Both commands
(fastroberta.train, fastroberta.finetune) are built from these parts; neither imports the other."""
