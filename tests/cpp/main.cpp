// Catch2 v2 single entry point for all core tests.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
