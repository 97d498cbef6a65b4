# Test registration helpers.
include(GoogleTest)

# ringattn_add_test(NAME target [LABELS ...] [TIMEOUT s]): one GoogleTest binary as one ctest case.
function(ringattn_add_test name)
  cmake_parse_arguments(A "" "TIMEOUT" "LABELS;ARGS" ${ARGN})
  if(NOT A_TIMEOUT)
    set(A_TIMEOUT 300)
  endif()
  add_test(NAME ${name} COMMAND $<TARGET_FILE:${name}> ${A_ARGS})
  set_tests_properties(${name} PROPERTIES TIMEOUT ${A_TIMEOUT} LABELS "unit;${A_LABELS}")
endfunction()

# ringattn_add_mpi_test(NAME name TARGET exe RANKS n [ARGS ...] [TIMEOUT s] [WILL_FAIL]):
# runs `mpiexec -n n exe args` as ctest case name_np<n>, with a timeout so a deadlock fails
# instead of hanging CI. Works as root and with more ranks than cores.
function(ringattn_add_mpi_test)
  cmake_parse_arguments(A "WILL_FAIL" "NAME;TARGET;RANKS;TIMEOUT" "ARGS;LABELS" ${ARGN})
  if(NOT A_TIMEOUT)
    set(A_TIMEOUT 180)
  endif()
  set(test_name ${A_NAME}_np${A_RANKS})
  add_test(NAME ${test_name}
    COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${A_RANKS} --oversubscribe
            ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${A_TARGET}> ${MPIEXEC_POSTFLAGS} ${A_ARGS})
  set_tests_properties(${test_name} PROPERTIES
    TIMEOUT ${A_TIMEOUT}
    LABELS "mpi;${A_LABELS}"
    PROCESSORS 2
    ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1;RINGATTN_NUM_THREADS=1")
  if(A_WILL_FAIL)
    set_tests_properties(${test_name} PROPERTIES WILL_FAIL TRUE)
  endif()
endfunction()
