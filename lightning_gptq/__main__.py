from lightning_gptq.cli import main

main()
