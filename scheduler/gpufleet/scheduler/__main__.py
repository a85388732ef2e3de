from gpufleet.scheduler.cli import main

main()
