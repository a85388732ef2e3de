from gpufleet.agent.cli import main

main()
