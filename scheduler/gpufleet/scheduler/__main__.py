from gpufleet.scheduler.cli.main import main

main()
